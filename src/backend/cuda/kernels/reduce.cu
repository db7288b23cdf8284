// Deterministic sums: no atomics anywhere. A sum over `len` elements is cut
// into chunks of DMKD_CHUNK elements that depend only on `len` (never on the
// device or the grid); pass 1 reduces each chunk in one block to a partial
// (thread t adds elements chunk*CHUNK + k*BLOCK + t for k = 0..ITEMS-1, in
// order, then block_sum), pass 2 reduces each segment's partials in one
// block (thread t adds partials t, t + BLOCK, ... in order, then block_sum).
// reduce.rs emulates this order exactly on the host.

// Pass 1 of sum_axes: `segments x len` index space, segment o reading
// x[offset(o, kept) + offset(r, red)] for r in [0, len). Block b handles
// segment b / chunks, chunk b % chunks.
extern "C" __global__ void sum_axes_partial(const T* x, T* partial, i64 len, i64 chunks,
                                            Strided kept, Strided red) {
    __shared__ T s[DMKD_BLOCK];
    const i64 seg = (i64)blockIdx.x / chunks;
    const i64 c = (i64)blockIdx.x - seg * chunks;
    const T* base = x + strided_offset(seg, kept);
    T acc = T(0);
#pragma unroll
    for (int k = 0; k < DMKD_ITEMS; ++k) {
        const i64 r = c * DMKD_CHUNK + (i64)k * DMKD_BLOCK + threadIdx.x;
        if (r < len) acc = acc + base[strided_offset(r, red)];
    }
    const T total = block_sum(acc, s);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Pass 2 of every two-pass sum: out[seg] = sum of partial[seg*chunks ..][..chunks].
extern "C" __global__ void reduce_partials(const T* partial, T* out, i64 chunks) {
    __shared__ T s[DMKD_BLOCK];
    const T* p = partial + (i64)blockIdx.x * chunks;
    T acc = T(0);
    for (i64 j = threadIdx.x; j < chunks; j += DMKD_BLOCK) acc = acc + p[j];
    const T total = block_sum(acc, s);
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// Short sums (len <= SEQ_MAX in reduce.rs): one thread per output adds its
// elements in row-major order of the reduced dims, starting from 0: exactly
// the reference backend's order, so the result is bit-identical to it.
extern "C" __global__ void sum_axes_seq(const T* x, T* out, i64 segments, i64 len, Strided kept,
                                        Strided red) {
    GRID_LOOP(o, segments) {
        const T* base = x + strided_offset(o, kept);
        T acc = T(0);
        for (i64 r = 0; r < len; ++r) acc = acc + base[strided_offset(r, red)];
        out[o] = acc;
    }
}
