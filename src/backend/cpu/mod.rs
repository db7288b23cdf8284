//! The fast CPU backend (work in progress: delegates to the reference loops
//! until the SIMD kernels land).

use crate::backend::reference::ReferenceBackend;
use crate::backend::{Backend, Binary, ConvArgs, InputMask, Unary};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// Convolution algorithm of the CPU backend (`--conv-algo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgo {
    /// Direct (implicit-GEMM) convolution everywhere.
    Direct,
    /// Winograd for every 3x3 stride-1 pad-1 convolution.
    Winograd,
    /// Pick per convolution by a measured rule.
    #[default]
    Auto,
}

impl std::str::FromStr for ConvAlgo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(ConvAlgo::Direct),
            "winograd" => Ok(ConvAlgo::Winograd),
            "auto" => Ok(ConvAlgo::Auto),
            other => Err(Error::arg(
                "conv-algo",
                format!("unknown conv algorithm `{other}` (direct, winograd or auto)"),
            )),
        }
    }
}

/// SIMD, multi-threaded, bit-deterministic CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    pub algo: ConvAlgo,
}

impl CpuBackend {
    pub fn new(algo: ConvAlgo) -> Self {
        CpuBackend { algo }
    }
}

impl<T: Float> Backend<T> for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        ReferenceBackend.conv2d(x, w, b, args)
    }
    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        ReferenceBackend.conv2d_backward_input(dy, w, args)
    }
    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        ReferenceBackend.conv2d_backward_weight(dy, x, args)
    }
    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>> {
        ReferenceBackend.conv2d_backward_bias(dy)
    }
    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>> {
        ReferenceBackend.unary(op, x)
    }
    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        ReferenceBackend.unary_backward(op, x, y, dy)
    }
    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        ReferenceBackend.binary(op, a, b, out_shape)
    }
    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>> {
        ReferenceBackend.mask_mul(x, mask)
    }
    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>> {
        ReferenceBackend.sum_axes(x, axes)
    }
    fn broadcast_to(&self, x: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
        ReferenceBackend.broadcast_to(x, shape)
    }
    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        ReferenceBackend.softmax(x, axis)
    }
    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        ReferenceBackend.softmax_backward(y, dy, axis)
    }
    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>> {
        ReferenceBackend.narrow(x, axis, start, len)
    }
    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        shape: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>> {
        ReferenceBackend.narrow_backward(dy, shape, axis, start)
    }
    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
        ReferenceBackend.sq_err_sum(a, b)
    }
    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>> {
        ReferenceBackend.sq_err_backward(a, b, g)
    }
}
