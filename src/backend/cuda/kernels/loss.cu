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

// Pass 1 of sum(r^2), r = wa*a + wb*b - t; the fused feature is never stored.
extern "C" __global__ void wpair_loss_partial(const T* a, const T* b, const T* t, T* partial,
                                              i64 n, T wa, T wb) {
    __shared__ T s[DMKD_BLOCK];
    const i64 c = blockIdx.x;
    T acc = T(0);
#pragma unroll
    for (int k = 0; k < DMKD_ITEMS; ++k) {
        const i64 i = c * DMKD_CHUNK + (i64)k * DMKD_BLOCK + threadIdx.x;
        if (i < n) {
            const T r = wa * a[i] + wb * b[i] - t[i];
            acc = acc + r * r;
        }
    }
    const T total = block_sum(acc, s);
    if (threadIdx.x == 0) partial[c] = total;
}

// Pass 1 of <r, a> and <r, b>: partial[c] and partial[chunks + c], so one
// reduce_partials launch with two segments finishes both.
extern "C" __global__ void wpair_dots_partial(const T* a, const T* b, const T* t, T* partial,
                                              i64 n, i64 chunks, T wa, T wb) {
    __shared__ T s[DMKD_BLOCK];
    const i64 c = blockIdx.x;
    T acc_a = T(0);
    T acc_b = T(0);
#pragma unroll
    for (int k = 0; k < DMKD_ITEMS; ++k) {
        const i64 i = c * DMKD_CHUNK + (i64)k * DMKD_BLOCK + threadIdx.x;
        if (i < n) {
            const T av = a[i];
            const T bv = b[i];
            const T r = wa * av + wb * bv - t[i];
            acc_a = acc_a + r * av;
            acc_b = acc_b + r * bv;
        }
    }
    const T total_a = block_sum(acc_a, s);
    const T total_b = block_sum(acc_b, s);
    if (threadIdx.x == 0) {
        partial[c] = total_a;
        partial[chunks + c] = total_b;
    }
}

// da = ca * r, db = cb * r with ca = 2 g wa, cb = 2 g wb (rounded on the host
// exactly as the reference backend rounds them).
extern "C" __global__ void wpair_grad(const T* a, const T* b, const T* t, T* da, T* db, i64 n,
                                      T wa, T wb, T ca, T cb) {
    GRID_LOOP(i, n) {
        const T r = wa * a[i] + wb * b[i] - t[i];
        da[i] = ca * r;
        db[i] = cb * r;
    }
}
