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
    // Row lengths of the stored matrices.
    let lda = if g.trans_a { g.m } else { g.k };
    let ldb = if g.trans_b { g.k } else { g.n };
    let cfg = StridedBatchedConfig {
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
    };
    let blas = dev.blas()?;
    // SAFETY: the three operands were checked above to hold every element
    // the configuration addresses (batch - 1 strides plus one matrix each,
    // with leading dims equal to the stored row lengths), the handle runs on
    // the stream that owns the buffers, and beta = 0 means C is only written.
    unsafe { T::gemm_strided_batched(&blas, cfg, b, a, c) }
        .map_err(|e| Error::Device(format!("cuBLAS GEMM: {e:?}")))
}
