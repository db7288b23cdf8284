// Softmax along one axis of x viewed as [outer, len, inner], max-subtracted:
// y_k = exp(x_k - max) / sum_j exp(x_j - max); backward dx_k = y_k (g_k - <g, y>).

// One thread per (outer, inner) row, the reference backend's exact order.
extern "C" __global__ void softmax_strided(const T* x, T* y, i64 outer, i64 len, i64 inner) {
    GRID_LOOP(idx, outer * inner) {
        const i64 o = idx / inner;
        const i64 base = o * len * inner + (idx - o * inner);
        T m = d_neg_inf(T(0));
        for (i64 k = 0; k < len; ++k) m = d_max(m, x[base + k * inner]);
        T sum = T(0);
        for (i64 k = 0; k < len; ++k) {
            const T e = d_exp(x[base + k * inner] - m);
            y[base + k * inner] = e;
            sum = sum + e;
        }
        for (i64 k = 0; k < len; ++k) y[base + k * inner] = y[base + k * inner] / sum;
    }
}

// One block per contiguous row (inner == 1, long rows such as the spatial
// attention over H*W): block_max, then the fixed-order block_sum. Each
// thread divides only the elements it wrote, so no extra barrier is needed.
extern "C" __global__ void softmax_rows(const T* x, T* y, i64 len) {
    __shared__ T s[DMKD_BLOCK];
    const T* xr = x + (i64)blockIdx.x * len;
    T* yr = y + (i64)blockIdx.x * len;
    T m = d_neg_inf(T(0));
    for (i64 k = threadIdx.x; k < len; k += DMKD_BLOCK) m = d_max(m, xr[k]);
    m = block_max(m, s);
    T acc = T(0);
    for (i64 k = threadIdx.x; k < len; k += DMKD_BLOCK) {
        const T e = d_exp(xr[k] - m);
        yr[k] = e;
        acc = acc + e;
    }
    const T sum = block_sum(acc, s);
    for (i64 k = threadIdx.x; k < len; k += DMKD_BLOCK) yr[k] = yr[k] / sum;
}

extern "C" __global__ void softmax_bwd_strided(const T* y, const T* g, T* dx, i64 outer, i64 len,
                                               i64 inner) {
    GRID_LOOP(idx, outer * inner) {
        const i64 o = idx / inner;
        const i64 base = o * len * inner + (idx - o * inner);
        T dot = T(0);
        for (i64 k = 0; k < len; ++k) dot = dot + g[base + k * inner] * y[base + k * inner];
        for (i64 k = 0; k < len; ++k) {
            const i64 j = base + k * inner;
            dx[j] = y[j] * (g[j] - dot);
        }
    }
}

extern "C" __global__ void softmax_bwd_rows(const T* y, const T* g, T* dx, i64 len) {
    __shared__ T s[DMKD_BLOCK];
    const i64 base = (i64)blockIdx.x * len;
    T acc = T(0);
    for (i64 k = threadIdx.x; k < len; k += DMKD_BLOCK) acc = acc + g[base + k] * y[base + k];
    const T dot = block_sum(acc, s);
    for (i64 k = threadIdx.x; k < len; k += DMKD_BLOCK) {
        const i64 j = base + k;
        dx[j] = y[j] * (g[j] - dot);
    }
}
