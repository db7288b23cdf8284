"""f32 accuracy of Winograd F(m x m, 3 x 3) for two tile sizes, against an f64 direct conv.

A throwaway-sized experiment kept so that docs/engineering.md's figures can be rerun:
`python reference/winograd_accuracy.py 256` (numpy only). The matrices come from the
Cook-Toom construction with a point at infinity: A^T and G from the points, B^T solved from
the exactness identity sum_j A^T[i,j] G[j,k] B^T[j,l] = [l == i + k] (checked to 1e-9).
The transforms run in the compute dtype, the channel sum by numpy's einsum, so the figures
are indicative of the algorithm's rounding, not of dmkd's exact kernels.
"""

import sys

import numpy as np


def matrices(points, m, r=3):
    a = np.array(points, dtype=np.float64)
    alpha = m + r - 1
    assert len(a) == alpha - 1
    at = np.zeros((m, alpha))
    for i in range(m):
        at[i, : alpha - 1] = a**i
    at[m - 1, alpha - 1] = 1.0
    g = np.zeros((alpha, r))
    for j in range(alpha - 1):
        f = np.prod([a[j] - a[l] for l in range(alpha - 1) if l != j])
        g[j] = a[j] ** np.arange(r) / f
    g[alpha - 1, r - 1] = 1.0
    rows, rhs = [], []
    for i in range(m):
        for k in range(r):
            for l in range(alpha):
                coef = np.zeros((alpha, alpha))
                coef[:, l] = at[i, :] * g[:, k]
                rows.append(coef.ravel())
                rhs.append(1.0 if l == i + k else 0.0)
    rows, rhs = np.array(rows), np.array(rhs)
    sol = np.linalg.lstsq(rows, rhs, rcond=None)[0]
    assert np.allclose(rows @ sol, rhs, atol=1e-9), "no exact B^T for these points"
    return at, g, sol.reshape(alpha, alpha)


def winograd(x, w, at, g, bt, dt):
    """3x3, stride 1, pad 1 conv of x [C, H, W] with w [M, C, 3, 3] by F(m x m, 3 x 3)."""
    m, alpha = at.shape
    c, h, wd = x.shape
    th, tw = -(-h // m), -(-wd // m)
    xp = np.zeros((c, th * m + 2, tw * m + 2), dt)
    xp[:, 1 : h + 1, 1 : wd + 1] = x
    at, g, bt = at.astype(dt), g.astype(dt), bt.astype(dt)
    u = np.einsum("ak,mckl,bl->abmc", g, w.astype(dt), g).astype(dt)
    y = np.zeros((w.shape[0], th * m, tw * m))
    for ty in range(th):
        for tx in range(tw):
            d = xp[:, ty * m : ty * m + alpha, tx * m : tx * m + alpha]
            v = np.einsum("ai,cij,bj->abc", bt, d, bt).astype(dt)
            prod = np.einsum("abmc,abc->abm", u, v).astype(dt)
            y[:, ty * m : (ty + 1) * m, tx * m : (tx + 1) * m] = np.einsum(
                "ia,abm,jb->mij", at, prod, at
            )
    return y[:, :h, :wd]


def direct(x, w):
    c, h, wd = x.shape
    xp = np.zeros((c, h + 2, wd + 2))
    xp[:, 1:-1, 1:-1] = x
    y = np.zeros((w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            y += np.einsum("mc,chw->mhw", w[:, :, dy, dx], xp[:, dy : dy + h, dx : dx + wd])
    return y


# The two tile sizes compared: name, the finite points (inf is added), outputs per tile side.
TILES = [
    ("F(4x4,3x3) 0,1,-1,2,-2,inf", [0, 1, -1, 2, -2], 4),
    ("F(6x6,3x3) 0,1,-1,2,-2,1/2,-1/2,inf", [0, 1, -1, 2, -2, 0.5, -0.5], 6),
]


def main():
    c = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c, 24, 36))
    w = rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)
    ref = direct(x, w)
    for name, points, m in TILES:
        at, g, bt = matrices(points, m)
        y = winograd(x.astype(np.float32), w.astype(np.float32), at, g, bt, np.float32)
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        print(f"C={c} {name}: f32 norm-wise {err:.2e}, max/max {abs(y - ref).max() / abs(ref).max():.2e}")
    # Spikes: 1% of the positions (every channel) scaled by s. A tile computes its outputs
    # from one transform, so a spike's rounding noise reaches outputs that do not read it;
    # the worst error there, over the rms output there, is what a ReLU after the conv sees
    # (docs/engineering.md, "Winograd and outliers").
    for s in [1e2, 1e3, 1e4]:
        xs = rng.standard_normal((c, 24, 36))
        spikes = rng.random((24, 36)) < 0.01
        xs[:, spikes] *= s
        ref = direct(xs, w)
        near = np.zeros_like(spikes)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(np.roll(spikes, dy, 0), dx, 1)
        far = ~near
        rms = np.sqrt((ref[:, far] ** 2).mean())
        errs = []
        for name, points, m in TILES:
            at, g, bt = matrices(points, m)
            y = winograd(xs.astype(np.float32), w.astype(np.float32), at, g, bt, np.float32)
            errs.append(f"{name.split()[0]} {abs(y - ref)[:, far].max() / rms:.1e}")
        print(f"C={c} spikes x{s:g} at 1% of positions, worst error away from them / rms: " + ", ".join(errs))


if __name__ == "__main__":
    main()
