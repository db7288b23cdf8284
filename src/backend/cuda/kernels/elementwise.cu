// Element-wise kernels: unary functions and their derivatives, broadcasting
// binary arithmetic, masking, layout copies and the conv epilogue. Each
// expression is written in the same order as the reference backend's, so
// with --fmad=false every result except exp/log is bit-identical to it.

// Unary op codes; must match `unary_code` in elementwise.rs.
#define U_RELU 0
#define U_ABS 1
#define U_NEG 2
#define U_EXP 3
#define U_LN 4
#define U_SQRT 5
#define U_RECIP 6
#define U_SQUARE 7
#define U_SCALE 8
#define U_ADD_SCALAR 9

__device__ __forceinline__ T unary_apply(int op, T x, T c) {
    switch (op) {
        case U_RELU: return x > T(0) ? x : T(0);
        case U_ABS: return d_abs(x);
        case U_NEG: return -x;
        case U_EXP: return d_exp(x);
        case U_LN: return d_log(x);
        case U_SQRT: return d_sqrt(x);
        case U_RECIP: return T(1) / x;
        case U_SQUARE: return x * x;
        case U_SCALE: return c * x;
        default: return x + c;  // U_ADD_SCALAR
    }
}

// f'(x) given x and y = f(x); relu'(0) = 0 and sign(0) = 0 (PyTorch's rule).
__device__ __forceinline__ T unary_deriv(int op, T x, T y, T c) {
    switch (op) {
        case U_RELU: return x > T(0) ? T(1) : T(0);
        case U_ABS: return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
        case U_NEG: return T(-1);
        case U_EXP: return y;
        case U_LN: return T(1) / x;
        case U_SQRT: return T(0.5) / y;
        case U_RECIP: return -(y * y);
        case U_SQUARE: return T(2) * x;
        case U_SCALE: return c;
        default: return T(1);  // U_ADD_SCALAR
    }
}

extern "C" __global__ void unary_fwd(const T* x, T* y, i64 n, int op, T c) {
    GRID_LOOP(i, n) { y[i] = unary_apply(op, x[i], c); }
}

extern "C" __global__ void unary_bwd(const T* x, const T* y, const T* dy, T* dx, i64 n, int op,
                                     T c) {
    GRID_LOOP(i, n) { dx[i] = dy[i] * unary_deriv(op, x[i], y[i], c); }
}

// Binary op codes; must match `binary_code` in elementwise.rs.
__device__ __forceinline__ T binary_apply(int op, T a, T b) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}

// Both operands have the output's shape (the common case, no index math).
extern "C" __global__ void binary_same(const T* a, const T* b, T* out, i64 n, int op) {
    GRID_LOOP(i, n) { out[i] = binary_apply(op, a[i], b[i]); }
}

// NumPy broadcasting: `s` describes the output index space and each
// operand's strides (0 along broadcast dims).
extern "C" __global__ void binary_bcast(const T* a, const T* b, T* out, i64 n, int op, Strided2 s) {
    GRID_LOOP(i, n) {
        i64 oa, ob;
        strided2_offsets(i, s, oa, ob);
        out[i] = binary_apply(op, a[oa], b[ob]);
    }
}

// out[i] = x[offset(i)]: broadcast_to (and any strided gather).
extern "C" __global__ void strided_copy(const T* x, T* out, i64 n, Strided s) {
    GRID_LOOP(i, n) { out[i] = x[strided_offset(i, s)]; }
}

// y = x * m for x of shape [N, C, HW]: kind 0 a spatial mask m[N, HW],
// kind 1 a channel mask m[N, C].
__device__ __forceinline__ T mask_value(const T* m, i64 i, i64 c, i64 hw, int kind) {
    const i64 nc = i / hw;
    return kind == 0 ? m[(nc / c) * hw + (i - nc * hw)] : m[nc];
}

extern "C" __global__ void mask_mul(const T* x, const T* m, T* y, i64 n, i64 c, i64 hw, int kind) {
    GRID_LOOP(i, n) { y[i] = x[i] * mask_value(m, i, c, hw, kind); }
}

extern "C" __global__ void mask_mul_inplace(T* y, const T* m, i64 n, i64 c, i64 hw, int kind) {
    GRID_LOOP(i, n) { y[i] = y[i] * mask_value(m, i, c, hw, kind); }
}

// The conv epilogue, in place on y [N, C, HW]: y = act(y + b[c]).
extern "C" __global__ void bias_act(T* y, const T* b, i64 n, i64 c, i64 hw, int has_bias,
                                    int relu) {
    GRID_LOOP(i, n) {
        T v = y[i];
        if (has_bias) v = v + b[(i / hw) % c];
        if (relu) v = v > T(0) ? v : T(0);
        y[i] = v;
    }
}

// y = x[:, start:start+len, :] with x viewed as [outer, full, inner].
extern "C" __global__ void narrow_copy(const T* x, T* y, i64 n, i64 full, i64 inner, i64 start,
                                       i64 len) {
    GRID_LOOP(i, n) {
        const i64 row = len * inner;
        const i64 o = i / row;
        const i64 r = i - o * row;
        y[i] = x[(o * full + start) * inner + r];
    }
}

// The adjoint: out [outer, full, inner] is zero except the slice, which is dy.
extern "C" __global__ void narrow_scatter(const T* dy, T* out, i64 n, i64 full, i64 inner,
                                          i64 start, i64 len) {
    GRID_LOOP(i, n) {
        const i64 q = i / inner;
        const i64 r = i - q * inner;
        const i64 o = q / full;
        const i64 k = q - o * full;
        out[i] = (k >= start && k < start + len) ? dy[(o * len + (k - start)) * inner + r] : T(0);
    }
}

// out[i] = sum_s partial[s * len + i], s = 0, 1, ... in order: the fixed-order
// combination of per-sample weight-gradient partials.
extern "C" __global__ void sum_samples(const T* partial, T* out, i64 samples, i64 len) {
    GRID_LOOP(i, len) {
        T acc = partial[i];
        for (i64 s = 1; s < samples; ++s) acc = acc + partial[s * len + i];
        out[i] = acc;
    }
}
