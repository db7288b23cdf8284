// Runs dmkd's CUDA kernels, unchanged, on the CPU (sim.h) and checks each
// against a plain double-precision implementation of its definition. The
// GEMMs that cuBLAS does on the device are plain loops here. Prints one line
// per check and exits non-zero on any failure. Built and run by
// tests/cuda_nvrtc.rs, which writes program.cu (kernels::program_source).
#include "sim.h"
#include "program.cu"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

static int failures = 0;
// f32: long sequential sums (14k terms) legitimately reach ~1e-5; an index
// or masking bug shows up as an O(1) error.
static const double TOL = sizeof(T) == 4 ? 3e-5 : 1e-13;

// max |got - want| / max |want| (want computed in double).
static void check(const std::string& what, const std::vector<T>& got, const std::vector<double>& want) {
    double maxw = 0, maxe = 0;
    bool ok = got.size() == want.size();
    for (size_t i = 0; ok && i < got.size(); ++i) {
        if (!std::isfinite((double)got[i])) ok = false;
        maxw = std::max(maxw, std::fabs(want[i]));
        maxe = std::max(maxe, std::fabs((double)got[i] - want[i]));
    }
    const double rel = maxw > 0 ? maxe / maxw : maxe;
    if (!ok || rel > TOL) {
        std::printf("FAIL %s: error %g (sizes %zu vs %zu)\n", what.c_str(), rel, got.size(), want.size());
        ++failures;
    } else {
        std::printf("ok   %s (%.1e)\n", what.c_str(), rel);
    }
}

static std::mt19937_64 rng(12345);
static std::vector<T> rnd(size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<T> v(n);
    for (auto& x : v) x = (T)u(rng);
    return v;
}
static std::vector<T> rmask(size_t n) {
    std::uniform_real_distribution<double> u(0, 1);
    std::vector<T> v(n);
    for (auto& x : v) x = u(rng) < 0.65 ? T(0) : T(1);
    return v;
}
static std::vector<double> dbl(const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); }

// Element-wise kernels run on a deliberately odd grid (3 blocks of 7
// threads) so the grid-stride loops wrap many times.
#define ELEM(call) sim_launch(3, 7, [&] { call; })
#define BLOCKS(n, call) sim_launch((unsigned)(n), DMKD_BLOCK, [&] { call; })

static Strided strided(std::vector<i64> dims, std::vector<i64> strides) {
    Strided s{};
    s.rank = (i64)dims.size();
    for (size_t k = 0; k < dims.size(); ++k) {
        s.dim[k] = dims[k];
        s.stride[k] = strides[k];
    }
    return s;
}

static void test_conv() {
    struct Case { i64 n, c, h, w, co, kh, kw, sh, sw, ph, pw; };
    const Case cases[] = {
        {2, 3, 5, 6, 4, 3, 3, 1, 1, 1, 1}, {3, 2, 7, 6, 3, 3, 3, 2, 2, 0, 0},
        {2, 3, 8, 7, 2, 5, 3, 2, 1, 2, 1}, {1, 2, 1, 1, 3, 3, 3, 1, 1, 1, 1},
        {2, 4, 4, 5, 3, 1, 1, 1, 1, 0, 0}, {2, 2, 6, 6, 2, 1, 1, 2, 2, 0, 0},
    };
    for (const Case& c : cases) {
        for (int mk = 0; mk < 3; ++mk) {
            const i64 oh = (c.h + 2 * c.ph - c.kh) / c.sh + 1, ow = (c.w + 2 * c.pw - c.kw) / c.sw + 1;
            const i64 K = c.c * c.kh * c.kw, P = oh * ow, HW = c.h * c.w;
            ConvGeom g{c.n, c.c, c.h, c.w, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw, oh, ow, mk};
            auto x = rnd(c.n * c.c * HW, -2, 2), wt = rnd(c.co * K, -1, 1), b = rnd(c.co, -1, 1);
            auto m = mk == 1 ? rmask(c.n * HW) : mk == 2 ? rmask(c.n * c.c) : std::vector<T>(1, T(7));
            auto mval = [&](i64 n, i64 ci, i64 pix) -> double {
                return mk == 1 ? m[n * HW + pix] : mk == 2 ? m[n * c.c + ci] : 1.0;
            };
            char name[160];
            std::snprintf(name, sizeof name, "conv n%lld c%lld->%lld %lldx%lld k%lldx%lld s%lld,%lld p%lld,%lld mask%d",
                          c.n, c.c, c.co, c.h, c.w, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw, mk);
            // forward: im2col (two groups: samples 0 and 1..n), GEMM, epilogue
            std::vector<T> col(c.n * K * P, T(-99));
            ELEM(im2col(x.data(), m.data(), col.data(), g, 0, 1));
            if (c.n > 1) ELEM(im2col(x.data(), m.data(), col.data() + K * P, g, 1, c.n - 1));
            std::vector<T> y(c.n * c.co * P);
            for (i64 s = 0; s < c.n; ++s)
                for (i64 o = 0; o < c.co; ++o)
                    for (i64 p = 0; p < P; ++p) {
                        double acc = 0;
                        for (i64 k = 0; k < K; ++k) acc += (double)wt[o * K + k] * col[(s * K + k) * P + p];
                        y[(s * c.co + o) * P + p] = (T)acc;
                    }
            ELEM(bias_act(y.data(), b.data(), c.n * c.co * P, c.co, P, 1, 1));
            std::vector<double> want(y.size());
            for (i64 s = 0; s < c.n; ++s)
                for (i64 o = 0; o < c.co; ++o)
                    for (i64 oy = 0; oy < oh; ++oy)
                        for (i64 ox = 0; ox < ow; ++ox) {
                            double acc = 0;
                            for (i64 ci = 0; ci < c.c; ++ci)
                                for (i64 ky = 0; ky < c.kh; ++ky)
                                    for (i64 kx = 0; kx < c.kw; ++kx) {
                                        const i64 iy = oy * c.sh + ky - c.ph, ix = ox * c.sw + kx - c.pw;
                                        if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                                        acc += (double)wt[((o * c.c + ci) * c.kh + ky) * c.kw + kx] *
                                               x[(s * c.c + ci) * HW + iy * c.w + ix] * mval(s, ci, iy * c.w + ix);
                                    }
                            acc += b[o];
                            want[(s * c.co + o) * P + oy * ow + ox] = acc > 0 ? acc : 0;
                        }
            check(std::string(name) + " forward", y, want);

            // input gradient: dcol = W^T dy (GEMM), col2im per sample group
            auto dy = rnd(c.n * c.co * P, -1, 1);
            std::vector<T> dcol(c.n * K * P);
            for (i64 s = 0; s < c.n; ++s)
                for (i64 k = 0; k < K; ++k)
                    for (i64 p = 0; p < P; ++p) {
                        double acc = 0;
                        for (i64 o = 0; o < c.co; ++o) acc += (double)wt[o * K + k] * dy[(s * c.co + o) * P + p];
                        dcol[(s * K + k) * P + p] = (T)acc;
                    }
            std::vector<T> dx(c.n * c.c * HW, T(-99));
            ELEM(col2im(dcol.data(), m.data(), dx.data(), g, 0, 1));
            if (c.n > 1) ELEM(col2im(dcol.data() + K * P, m.data(), dx.data(), g, 1, c.n - 1));
            std::vector<double> wdx(dx.size(), 0.0);
            for (i64 s = 0; s < c.n; ++s)
                for (i64 o = 0; o < c.co; ++o)
                    for (i64 ci = 0; ci < c.c; ++ci)
                        for (i64 ky = 0; ky < c.kh; ++ky)
                            for (i64 kx = 0; kx < c.kw; ++kx)
                                for (i64 oy = 0; oy < oh; ++oy)
                                    for (i64 ox = 0; ox < ow; ++ox) {
                                        const i64 iy = oy * c.sh + ky - c.ph, ix = ox * c.sw + kx - c.pw;
                                        if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                                        wdx[(s * c.c + ci) * HW + iy * c.w + ix] +=
                                            (double)wt[((o * c.c + ci) * c.kh + ky) * c.kw + kx] * dy[(s * c.co + o) * P + oy * ow + ox];
                                    }
            for (i64 s = 0; s < c.n; ++s)
                for (i64 ci = 0; ci < c.c; ++ci)
                    for (i64 pix = 0; pix < HW; ++pix) wdx[(s * c.c + ci) * HW + pix] *= mval(s, ci, pix);
            check(std::string(name) + " dx", dx, wdx);

            // weight gradient: per-sample dy_s col_s^T partials, then sum_samples
            std::vector<T> part(c.n * c.co * K);
            for (i64 s = 0; s < c.n; ++s)
                for (i64 o = 0; o < c.co; ++o)
                    for (i64 k = 0; k < K; ++k) {
                        double acc = 0;
                        for (i64 p = 0; p < P; ++p) acc += (double)dy[(s * c.co + o) * P + p] * col[(s * K + k) * P + p];
                        part[(s * c.co + o) * K + k] = (T)acc;
                    }
            std::vector<T> dw(c.co * K);
            ELEM(sum_samples(part.data(), dw.data(), c.n, c.co * K));
            std::vector<double> wdw(dw.size(), 0.0);
            for (i64 s = 0; s < c.n; ++s)
                for (i64 o = 0; o < c.co; ++o)
                    for (i64 ci = 0; ci < c.c; ++ci)
                        for (i64 ky = 0; ky < c.kh; ++ky)
                            for (i64 kx = 0; kx < c.kw; ++kx)
                                for (i64 oy = 0; oy < oh; ++oy)
                                    for (i64 ox = 0; ox < ow; ++ox) {
                                        const i64 iy = oy * c.sh + ky - c.ph, ix = ox * c.sw + kx - c.pw;
                                        if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                                        wdw[((o * c.c + ci) * c.kh + ky) * c.kw + kx] +=
                                            (double)dy[(s * c.co + o) * P + oy * ow + ox] *
                                            x[(s * c.c + ci) * HW + iy * c.w + ix] * mval(s, ci, iy * c.w + ix);
                                    }
            check(std::string(name) + " dw", dw, wdw);
        }
    }
}

static void test_reductions() {
    // x of shape [A, B, C] summed over axes {0, 2}: B outputs of A*C terms.
    const i64 shapes[][3] = {{3, 4, 5}, {3, 2, 1500}, {1, 3, 1}, {7, 1, 2049}};
    for (auto& sh : shapes) {
        const i64 A = sh[0], B = sh[1], C = sh[2], len = A * C;
        auto x = rnd(A * B * C, -2, 2);
        Strided kept = strided({B}, {C}), red = strided({A, C}, {B * C, 1});
        std::vector<double> want(B, 0.0);
        for (i64 a = 0; a < A; ++a)
            for (i64 bb = 0; bb < B; ++bb)
                for (i64 cc = 0; cc < C; ++cc) want[bb] += x[(a * B + bb) * C + cc];
        char name[96];
        std::snprintf(name, sizeof name, "sum over {0,2} of [%lld,%lld,%lld]", A, B, C);
        std::vector<T> seq(B, T(-99));
        ELEM(sum_axes_seq(x.data(), seq.data(), B, len, kept, red));
        check(std::string(name) + " seq", seq, want);
        const i64 chunks = std::max<i64>(1, (len + DMKD_CHUNK - 1) / DMKD_CHUNK);
        std::vector<T> part(B * chunks, T(-99)), out(B, T(-99));
        BLOCKS(B * chunks, sum_axes_partial(x.data(), part.data(), len, chunks, kept, red));
        BLOCKS(B, reduce_partials(part.data(), out.data(), chunks));
        check(std::string(name) + " two-pass", out, want);
    }
    // Losses over n elements.
    for (i64 n : {1LL, 1000LL, 3LL * DMKD_CHUNK + 7}) {
        auto a = rnd(n, -2, 2), b = rnd(n, -2, 2), t = rnd(n, -2, 2);
        const T wa = T(0.3), wb = T(0.7);
        const i64 chunks = std::max<i64>(1, (n + DMKD_CHUNK - 1) / DMKD_CHUNK);
        double sq = 0, wp = 0, ra = 0, rb = 0;
        std::vector<double> wr(n), wsg(n);
        for (i64 i = 0; i < n; ++i) {
            const double d = (double)a[i] - b[i], r = (double)wa * a[i] + (double)wb * b[i] - t[i];
            sq += d * d;
            wp += r * r;
            ra += r * a[i];
            rb += r * b[i];
            wr[i] = r;
            wsg[i] = 1.5 * d;
        }
        const std::string nm = "losses n=" + std::to_string(n);
        std::vector<T> part(2 * chunks), out(2);
        BLOCKS(chunks, sq_err_partial(a.data(), b.data(), part.data(), n));
        BLOCKS(1, reduce_partials(part.data(), out.data(), chunks));
        check(nm + " sq_err_sum", {out[0]}, {sq});
        std::vector<T> r(n), part3(3 * chunks), sums(3);
        BLOCKS(chunks, wpair_residual_partial(a.data(), b.data(), t.data(), r.data(), part3.data(), n,
                                              chunks, wa, wb));
        BLOCKS(3, reduce_partials(part3.data(), sums.data(), chunks));
        check(nm + " residual", r, wr);
        check(nm + " sum(r^2) <r,a> <r,b>", sums, {wp, ra, rb});
        std::vector<T> g(n);
        ELEM(sq_err_grad(a.data(), b.data(), g.data(), n, T(1.5)));
        check(nm + " sq_err grad", g, wsg);
    }
}

static void test_softmax() {
    const i64 shapes[][3] = {{3, 7, 4}, {2, 1500, 1}, {1, 1, 1}, {4, 3, 1}};
    for (auto& sh : shapes) {
        const i64 O = sh[0], L = sh[1], I = sh[2], n = O * L * I;
        auto x = rnd(n, -3, 3), g = rnd(n, -1, 1);
        std::vector<double> wy(n), wdx(n);
        for (i64 o = 0; o < O; ++o)
            for (i64 i = 0; i < I; ++i) {
                double mx = -INFINITY, s = 0, dot = 0;
                for (i64 k = 0; k < L; ++k) mx = std::max(mx, (double)x[(o * L + k) * I + i]);
                for (i64 k = 0; k < L; ++k) s += std::exp((double)x[(o * L + k) * I + i] - mx);
                for (i64 k = 0; k < L; ++k) wy[(o * L + k) * I + i] = std::exp((double)x[(o * L + k) * I + i] - mx) / s;
                for (i64 k = 0; k < L; ++k) dot += g[(o * L + k) * I + i] * wy[(o * L + k) * I + i];
                for (i64 k = 0; k < L; ++k) {
                    const i64 j = (o * L + k) * I + i;
                    wdx[j] = wy[j] * (g[j] - dot);
                }
            }
        char name[96];
        std::snprintf(name, sizeof name, "softmax [%lld,%lld,%lld] axis 1", O, L, I);
        std::vector<T> y(n, T(-99)), dx(n, T(-99));
        ELEM(softmax_strided(x.data(), y.data(), O, L, I));
        check(std::string(name) + " strided", y, wy);
        ELEM(softmax_bwd_strided(y.data(), g.data(), dx.data(), O, L, I));
        check(std::string(name) + " strided backward", dx, wdx);
        if (I == 1) {
            std::fill(y.begin(), y.end(), T(-99));
            BLOCKS(O, softmax_rows(x.data(), y.data(), L));
            check(std::string(name) + " rows", y, wy);
            std::fill(dx.begin(), dx.end(), T(-99));
            BLOCKS(O, softmax_bwd_rows(y.data(), g.data(), dx.data(), L));
            check(std::string(name) + " rows backward", dx, wdx);
        }
    }
}

static void test_elementwise() {
    const i64 n = 120;  // [2, 3, 4, 5]
    auto x = rnd(n, 0.5, 2), xs = rnd(n, -2, 2), dy = rnd(n, -1, 1);
    const char* names[] = {"relu", "abs", "neg", "exp", "ln", "sqrt", "recip", "square", "scale", "add"};
    for (int op = 0; op < 10; ++op) {
        const auto& in = (op == 4 || op == 5 || op == 6) ? x : xs;
        std::vector<double> wy(n), wd(n);
        for (i64 i = 0; i < n; ++i) {
            const double v = in[i];
            double y, d;
            switch (op) {
                case 0: y = v > 0 ? v : 0; d = v > 0; break;
                case 1: y = std::fabs(v); d = v > 0 ? 1 : v < 0 ? -1 : 0; break;
                case 2: y = -v; d = -1; break;
                case 3: y = std::exp(v); d = y; break;
                case 4: y = std::log(v); d = 1 / v; break;
                case 5: y = std::sqrt(v); d = 0.5 / y; break;
                case 6: y = 1 / v; d = -y * y; break;
                case 7: y = v * v; d = 2 * v; break;
                case 8: y = 0.25 * v; d = 0.25; break;
                default: y = v + 0.25; d = 1; break;
            }
            wy[i] = y;
            wd[i] = dy[i] * d;
        }
        std::vector<T> y(n), dx(n);
        ELEM(unary_fwd(in.data(), y.data(), n, op, T(0.25)));
        check(std::string("unary ") + names[op], y, wy);
        ELEM(unary_bwd(in.data(), y.data(), dy.data(), dx.data(), n, op, T(0.25)));
        check(std::string("unary ") + names[op] + " backward", dx, wd);
    }
    // [2,3,4] op [1,3,1], and the plain same-shape kernel
    auto a = rnd(24, -2, 2), b = rnd(3, 0.5, 2), b2 = rnd(24, 0.5, 2);
    Strided2 s{};
    s.rank = 3;
    const i64 dims[] = {2, 3, 4}, sa[] = {12, 4, 1}, sb[] = {0, 1, 0};
    for (int k = 0; k < 3; ++k) { s.dim[k] = dims[k]; s.sa[k] = sa[k]; s.sb[k] = sb[k]; }
    for (int op = 0; op < 4; ++op) {
        std::vector<double> want(24), want2(24);
        for (i64 i = 0; i < 24; ++i) {
            const double u = a[i], v = b[(i / 4) % 3], v2 = b2[i];
            want[i] = op == 0 ? u + v : op == 1 ? u - v : op == 2 ? u * v : u / v;
            want2[i] = op == 0 ? u + v2 : op == 1 ? u - v2 : op == 2 ? u * v2 : u / v2;
        }
        std::vector<T> out(24);
        ELEM(binary_bcast(a.data(), b.data(), out.data(), 24, op, s));
        check("binary_bcast op " + std::to_string(op), out, want);
        ELEM(binary_same(a.data(), b2.data(), out.data(), 24, op));
        check("binary_same op " + std::to_string(op), out, want2);
    }
    {  // broadcast [3] -> [2, 3, 4]
        std::vector<T> out(24);
        Strided st = strided({2, 3, 4}, {0, 1, 0});
        ELEM(strided_copy(b.data(), out.data(), 24, st));
        std::vector<double> want(24);
        for (i64 i = 0; i < 24; ++i) want[i] = b[(i / 4) % 3];
        check("strided_copy", out, want);
    }
    // masks on [2, 3, 20]
    auto mx = rnd(120, -2, 2), ms = rmask(40), mc = rmask(6);
    for (int kind = 0; kind < 2; ++kind) {
        const auto& m = kind == 0 ? ms : mc;
        std::vector<double> want(120);
        for (i64 i = 0; i < 120; ++i) {
            const i64 n_ = i / 60, c = (i / 20) % 3, p = i % 20;
            want[i] = mx[i] * (kind == 0 ? (double)ms[n_ * 20 + p] : (double)mc[n_ * 3 + c]);
        }
        std::vector<T> out(120);
        ELEM(mask_mul(mx.data(), m.data(), out.data(), 120, 3, 20, kind));
        check("mask_mul kind " + std::to_string(kind), out, want);
        std::vector<T> inplace = mx;
        ELEM(mask_mul_inplace(inplace.data(), m.data(), 120, 3, 20, kind));
        check("mask_mul_inplace kind " + std::to_string(kind), inplace, want);
    }
    {  // narrow [2, 5, 3] axis 1, 1..4, and its adjoint
        auto nx = rnd(30, -2, 2);
        std::vector<T> y(18), back(30, T(-99));
        ELEM(narrow_copy(nx.data(), y.data(), 18, 5, 3, 1, 3));
        std::vector<double> want(18), wback(30, 0.0);
        for (i64 o = 0; o < 2; ++o)
            for (i64 k = 0; k < 3; ++k)
                for (i64 r = 0; r < 3; ++r) {
                    want[(o * 3 + k) * 3 + r] = nx[(o * 5 + k + 1) * 3 + r];
                    wback[(o * 5 + k + 1) * 3 + r] = nx[(o * 5 + k + 1) * 3 + r];
                }
        check("narrow_copy", y, want);
        ELEM(narrow_scatter(y.data(), back.data(), 30, 5, 3, 1, 3));
        check("narrow_scatter", back, wback);
    }
}

int main() {
    std::printf("element type: %s\n", sizeof(T) == 4 ? "float" : "double");
    test_elementwise();
    test_reductions();
    test_softmax();
    test_conv();
    std::printf("%d failures\n", failures);
    return failures == 0 ? 0 : 1;
}
