// Shared definitions of every dmkd kernel. kernels.rs prepends a header that
// fixes the element type and the launch constants:
//   typedef float T;            (or double: one module per element type)
//   #define DMKD_BLOCK 256      threads per block of every reduction
//   #define DMKD_ITEMS 8        elements per thread per reduction chunk
//   #define DMKD_MAX_RANK 8     dims of an index descriptor
// The host side (index.rs, reduce.rs) reads the same constants, so a launch
// and its host-side emulation cannot drift apart.

typedef long long i64;

#define DMKD_CHUNK (DMKD_BLOCK * DMKD_ITEMS)

// A row-major index space (`dim`) read through strides into one buffer
// (`stride`, 0 along broadcast dims). Mirrors `index::Strided`.
struct Strided {
    i64 rank;
    i64 dim[DMKD_MAX_RANK];
    i64 stride[DMKD_MAX_RANK];
};

// An index space read by two operands (binary ops). Mirrors `index::Strided2`.
struct Strided2 {
    i64 rank;
    i64 dim[DMKD_MAX_RANK];
    i64 sa[DMKD_MAX_RANK];
    i64 sb[DMKD_MAX_RANK];
};

// Kernel parameters are copied byte for byte from the Rust structs: the
// layouts must agree (all fields are 64-bit, so there is no padding).
static_assert(sizeof(Strided) == 8 * (1 + 2 * DMKD_MAX_RANK), "Strided layout");
static_assert(sizeof(Strided2) == 8 * (1 + 3 * DMKD_MAX_RANK), "Strided2 layout");

// Every thread of a grid-stride loop; `n` may exceed the grid.
#define GRID_LOOP(i, n)                                                        \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n);     \
         i += (i64)blockDim.x * gridDim.x)

// Offset of row-major linear index `i` of `s`. The loop is unrolled over the
// fixed maximum rank so the descriptor is read with constant indices (kept
// in registers / the parameter bank, never spilled to local memory).
__device__ __forceinline__ i64 strided_offset(i64 i, const Strided& s) {
    i64 off = 0;
#pragma unroll
    for (int k = DMKD_MAX_RANK - 1; k >= 0; --k) {
        if (k < s.rank) {
            const i64 d = s.dim[k];
            const i64 q = i / d;
            off += (i - q * d) * s.stride[k];
            i = q;
        }
    }
    return off;
}

// Both operand offsets of row-major linear index `i` of `s`.
__device__ __forceinline__ void strided2_offsets(i64 i, const Strided2& s, i64& oa, i64& ob) {
    oa = 0;
    ob = 0;
#pragma unroll
    for (int k = DMKD_MAX_RANK - 1; k >= 0; --k) {
        if (k < s.rank) {
            const i64 d = s.dim[k];
            const i64 q = i / d;
            const i64 r = i - q * d;
            oa += r * s.sa[k];
            ob += r * s.sb[k];
            i = q;
        }
    }
}

// Math by element type. The module is compiled with --fmad=false,
// --prec-div=true, --prec-sqrt=true and --ftz=false, so +, -, *, / and sqrt
// round exactly as IEEE (as on the CPU); exp and log are CUDA's (at most
// 1 ulp in double, 2 ulp in float, against the CPU's libm).
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float d_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double d_abs(double x) { return fabs(x); }
// fmax returns the other operand when one is NaN, as Rust's f64::max does.
__device__ __forceinline__ float d_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double d_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float d_neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double d_neg_inf(double) {
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

// Sum of one value per thread over a block of DMKD_BLOCK threads, with a
// fixed pairing (s[t] += s[t + half] for half = BLOCK/2, ..., 1): the result
// depends only on the values, never on scheduling. Every thread of the block
// must call it; every thread gets the total. reduce.rs emulates it exactly.
__device__ __forceinline__ T block_sum(T v, T* s) {
    __syncthreads();  // a previous call's readers of s[0] are done
    s[threadIdx.x] = v;
    __syncthreads();
#pragma unroll
    for (int half = DMKD_BLOCK / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) s[threadIdx.x] = s[threadIdx.x] + s[threadIdx.x + half];
        __syncthreads();
    }
    return s[0];
}

// Maximum over the block (exact in any order), same calling rules.
__device__ __forceinline__ T block_max(T v, T* s) {
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
#pragma unroll
    for (int half = DMKD_BLOCK / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) s[threadIdx.x] = d_max(s[threadIdx.x], s[threadIdx.x + half]);
        __syncthreads();
    }
    return s[0];
}
