//! Row-major GEMMs on cuBLAS (sgemm / dgemm, strided-batched).
//!
//! cuBLAS is column-major. A row-major `m x n` matrix with leading dim `n`
//! is the column-major `n x m` matrix of its transpose, so the row-major
//! product `C = op(A) op(B)` is computed as the column-major product
//! `C^T = op(B)^T op(A)^T`: B is passed first, the dims swap (`m' = n`,
//! `n' = m`), each operand keeps its own transpose flag, and every leading
//! dim is the row length of the matrix as stored.
//!
//! cuBLAS's default math mode never lowers f32 to TF32 (that takes
//! `CUBLAS_TF32_TENSOR_OP_MATH`), and with one stream its results are
//! bit-reproducible run to run on a given GPU and cuBLAS version.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaView, CudaViewMut};

use crate::error::{Error, Result};
use crate::tensor::Float;

use super::device::{CudaFloat, Device, check_len};

/// `C[b] = op(A[b]) op(B[b])` for `b` in `0..batch`, all row-major, with
/// `op(A)` of shape `m x k` and `op(B)` of shape `k x n`. A stride of 0
/// reuses one matrix for every batch entry (the conv weight).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored `k x m` (and transposed) rather than `m x k`.
    pub trans_a: bool,
    /// B is stored `n x k` (and transposed) rather than `k x n`.
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

/// Elements a batched operand spans: the last matrix's start plus one matrix.
fn span(batch: usize, stride: usize, matrix: usize) -> usize {
    (batch - 1) * stride + matrix
}

fn as_int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device(format!("GEMM {what} = {v} exceeds cuBLAS's int")))
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// The cuBLAS (column-major) configuration of the row-major product `g`.
/// Its operand A is the row-major B and its operand B the row-major A.
pub(crate) fn cublas_config<T: Float>(g: &RowGemm) -> Result<StridedBatchedConfig<T>> {
    // Row lengths of the stored matrices.
    let lda = if g.trans_a { g.m } else { g.k };
    let ldb = if g.trans_b { g.k } else { g.n };
    Ok(StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(g.trans_b),
            transb: op(g.trans_a),
            m: as_int("n", g.n)?,
            n: as_int("m", g.m)?,
            k: as_int("k", g.k)?,
            alpha: T::one(),
            lda: as_int("ldb", ldb)?,
            ldb: as_int("lda", lda)?,
            beta: T::zero(),
            ldc: as_int("ldc", g.n)?,
        },
        batch_size: as_int("batch", g.batch)?,
        stride_a: g.stride_b as i64,
        stride_b: g.stride_a as i64,
        stride_c: g.stride_c as i64,
    })
}

/// Run `g` on the device's stream, writing every element of each `C[b]`
/// (beta = 0: C is not read, so it may be uninitialised).
pub(crate) fn gemm<T: CudaFloat>(
    dev: &Device,
    g: &RowGemm,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    if g.k == 0 {
        return Err(Error::Device("GEMM with k = 0".into()));
    }
    // The bounds cuBLAS will touch, checked before the call.
    check_len(
        "GEMM operand A",
        a.len(),
        span(g.batch, g.stride_a, g.m * g.k),
    )?;
    check_len(
        "GEMM operand B",
        b.len(),
        span(g.batch, g.stride_b, g.k * g.n),
    )?;
    check_len(
        "GEMM output C",
        c.len(),
        span(g.batch, g.stride_c, g.m * g.n),
    )?;
    let cfg = cublas_config::<T>(g)?;
    let blas = dev.blas()?;
    // SAFETY: the three operands were checked above to hold every element
    // the configuration addresses (batch - 1 strides plus one matrix each,
    // with leading dims equal to the stored row lengths), the handle runs on
    // the stream that owns the buffers, and beta = 0 means C is only written.
    unsafe { T::gemm_strided_batched(&blas, cfg, b, a, c) }
        .map_err(|e| Error::Device(format!("cuBLAS GEMM: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's `gemmStridedBatched` by its definition (column-major,
    /// alpha = 1, beta = 0), on the host.
    fn cublas_emulated(cfg: &StridedBatchedConfig<f64>, a: &[f64], b: &[f64], c: &mut [f64]) {
        let g = &cfg.gemm;
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        let t = |o: cublasOperation_t| o == cublasOperation_t::CUBLAS_OP_T;
        for bi in 0..cfg.batch_size as usize {
            let (ao, bo, co) = (
                bi * cfg.stride_a as usize,
                bi * cfg.stride_b as usize,
                bi * cfg.stride_c as usize,
            );
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0;
                    for l in 0..k {
                        let av = if t(g.transa) {
                            a[ao + l + i * lda]
                        } else {
                            a[ao + i + l * lda]
                        };
                        let bv = if t(g.transb) {
                            b[bo + j + l * ldb]
                        } else {
                            b[bo + l + j * ldb]
                        };
                        acc += av * bv;
                    }
                    c[co + i + j * ldc] = acc;
                }
            }
        }
    }

    /// The row-major product `op(A) op(B)`, batched, by its definition.
    fn row_major(g: &RowGemm, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![f64::NAN; span(g.batch, g.stride_c, g.m * g.n)];
        for bi in 0..g.batch {
            let (a, b) = (&a[bi * g.stride_a..], &b[bi * g.stride_b..]);
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0.0;
                    for l in 0..g.k {
                        let av = if g.trans_a {
                            a[l * g.m + i]
                        } else {
                            a[i * g.k + l]
                        };
                        let bv = if g.trans_b {
                            b[j * g.k + l]
                        } else {
                            b[l * g.n + j]
                        };
                        acc += av * bv;
                    }
                    c[bi * g.stride_c + i * g.n + j] = acc;
                }
            }
        }
        c
    }

    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let shapes = |m: usize, n: usize, k: usize, ta: bool, tb: bool, shared_a: bool| RowGemm {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            batch: 3,
            stride_a: if shared_a { 0 } else { m * k + 2 },
            stride_b: k * n + 1,
            stride_c: m * n + 3,
        };
        let mut cases = Vec::new();
        for ta in [false, true] {
            for tb in [false, true] {
                for shared in [false, true] {
                    cases.push(shapes(4, 7, 5, ta, tb, shared));
                    cases.push(shapes(1, 3, 2, ta, tb, shared));
                }
            }
        }
        for g in cases {
            let a: Vec<f64> = (0..span(g.batch, g.stride_a, g.m * g.k))
                .map(|i| ((i * 37 % 11) as f64) - 5.0)
                .collect();
            let b: Vec<f64> = (0..span(g.batch, g.stride_b, g.k * g.n))
                .map(|i| ((i * 53 % 13) as f64) - 6.0)
                .collect();
            let want = row_major(&g, &a, &b);
            let cfg = cublas_config::<f64>(&g).unwrap();
            let mut got = vec![f64::NAN; want.len()];
            // The backend passes the row-major B as cuBLAS's A.
            cublas_emulated(&cfg, &b, &a, &mut got);
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!(
                    x == y || (x.is_nan() && y.is_nan()),
                    "{g:?} at {i}: {x} vs {y}"
                );
            }
        }
    }
}
