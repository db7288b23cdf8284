// The squared-error losses: sums in the two-pass order of reduce.cu, and the
// element-wise gradients. r = wa*a + wb*b - t is evaluated left to right in
// the reference backend's rounding order ((wa*a) + (wb*b)) - t.

// Pass 1 of sum((a - b)^2); one block per chunk.
extern "C" __global__ void sq_err_partial(const T* a, const T* b, T* partial, i64 n) {
    __shared__ T s[DMKD_BLOCK];
    const i64 c = blockIdx.x;
    T acc = T(0);
#pragma unroll
    for (int k = 0; k < DMKD_ITEMS; ++k) {
        const i64 i = c * DMKD_CHUNK + (i64)k * DMKD_BLOCK + threadIdx.x;
        if (i < n) {
            const T d = a[i] - b[i];
            acc = acc + d * d;
        }
    }
    const T total = block_sum(acc, s);
    if (threadIdx.x == 0) partial[c] = total;
}

// out = two_g * (a - b).
extern "C" __global__ void sq_err_grad(const T* a, const T* b, T* out, i64 n, T two_g) {
    GRID_LOOP(i, n) { out[i] = two_g * (a[i] - b[i]); }
}

// DMKD's fused loss pass: writes r = wa*a + wb*b - t and pass 1 of the three
// sums the loss and its backward pass need: sum(r^2) in partial[c], <r, a> in
// partial[chunks + c], <r, b> in partial[2 * chunks + c], so one
// reduce_partials launch with three segments finishes all of them. The fused
// feature is never stored.
extern "C" __global__ void wpair_residual_partial(const T* a, const T* b, const T* t, T* r,
                                                  T* partial, i64 n, i64 chunks, T wa, T wb) {
    __shared__ T s[DMKD_BLOCK];
    const i64 c = blockIdx.x;
    T acc_r = T(0);
    T acc_a = T(0);
    T acc_b = T(0);
#pragma unroll
    for (int k = 0; k < DMKD_ITEMS; ++k) {
        const i64 i = c * DMKD_CHUNK + (i64)k * DMKD_BLOCK + threadIdx.x;
        if (i < n) {
            const T av = a[i];
            const T bv = b[i];
            const T ri = wa * av + wb * bv - t[i];
            r[i] = ri;
            acc_r = acc_r + ri * ri;
            acc_a = acc_a + ri * av;
            acc_b = acc_b + ri * bv;
        }
    }
    const T total_r = block_sum(acc_r, s);
    const T total_a = block_sum(acc_a, s);
    const T total_b = block_sum(acc_b, s);
    if (threadIdx.x == 0) {
        partial[c] = total_r;
        partial[chunks + c] = total_a;
        partial[2 * chunks + c] = total_b;
    }
}
