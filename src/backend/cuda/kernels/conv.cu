// Convolution data movement around cuBLAS GEMMs (conv.rs): im2col with the
// input mask applied (masked entries are exact zeros, x * 0), and the
// gather form of col2im (one thread per input element, kernel taps in a
// fixed order, no atomics) with the mask applied to dX.

// Mirrors `index::ConvGeomC`; mask_kind 0 none, 1 spatial m[N, H*W], 2 channel m[N, C].
struct ConvGeom {
    i64 n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, mask_kind;
};
static_assert(sizeof(ConvGeom) == 8 * 13, "ConvGeom layout");

__device__ __forceinline__ T conv_mask(const T* m, const ConvGeom& g, i64 n, i64 ci, i64 pix) {
    return g.mask_kind == 1 ? m[n * g.h * g.w + pix] : m[n * g.c + ci];
}

// col[j][k][p] for samples n0 + j, j < count, with k = (ci*kh + ky)*kw + kx
// (the OIHW weight's column order) and p = oy*ow + ox.
extern "C" __global__ void im2col(const T* x, const T* m, T* col, ConvGeom g, i64 n0, i64 count) {
    const i64 K = g.c * g.kh * g.kw;
    const i64 P = g.oh * g.ow;
    GRID_LOOP(idx, count * K * P) {
        const i64 p = idx % P;
        const i64 t = idx / P;
        const i64 k = t % K;
        const i64 n = n0 + t / K;
        const i64 ox = p % g.ow;
        const i64 oy = p / g.ow;
        const i64 kx = k % g.kw;
        const i64 t2 = k / g.kw;
        const i64 ky = t2 % g.kh;
        const i64 ci = t2 / g.kh;
        const i64 iy = oy * g.sh + ky - g.ph;
        const i64 ix = ox * g.sw + kx - g.pw;
        T v = T(0);
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) {
            const i64 pix = iy * g.w + ix;
            v = x[(n * g.c + ci) * g.h * g.w + pix];
            if (g.mask_kind != 0) v = v * conv_mask(m, g, n, ci, pix);
        }
        col[idx] = v;
    }
}

// dx[n0 + j][ci][iy][ix] = mask * sum over (ky, kx), in that order, of
// dcol[j][(ci*kh + ky)*kw + kx][oy*ow + ox] where oy*sh + ky - ph = iy and
// ox*sw + kx - pw = ix. `dx` is the whole [N, C, H, W] gradient.
extern "C" __global__ void col2im(const T* dcol, const T* m, T* dx, ConvGeom g, i64 n0,
                                  i64 count) {
    const i64 K = g.c * g.kh * g.kw;
    const i64 P = g.oh * g.ow;
    const i64 HW = g.h * g.w;
    GRID_LOOP(idx, count * g.c * HW) {
        const i64 pix = idx % HW;
        const i64 t = idx / HW;
        const i64 ci = t % g.c;
        const i64 j = t / g.c;
        const i64 iy = pix / g.w;
        const i64 ix = pix - iy * g.w;
        const T* dj = dcol + j * K * P;
        T acc = T(0);
        for (i64 ky = 0; ky < g.kh; ++ky) {
            const i64 ty = iy + g.ph - ky;
            if (ty < 0 || ty % g.sh != 0) continue;
            const i64 oy = ty / g.sh;
            if (oy >= g.oh) continue;
            for (i64 kx = 0; kx < g.kw; ++kx) {
                const i64 tx = ix + g.pw - kx;
                if (tx < 0 || tx % g.sw != 0) continue;
                const i64 ox = tx / g.sw;
                if (ox >= g.ow) continue;
                acc = acc + dj[((ci * g.kh + ky) * g.kw + kx) * P + oy * g.ow + ox];
            }
        }
        if (g.mask_kind != 0) acc = acc * conv_mask(m, g, n0 + j, ci, pix);
        dx[n0 * g.c * HW + idx] = acc;
    }
}
