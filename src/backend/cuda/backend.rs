//! `CudaBackend`: the `Backend` trait on the device kernels.
//!
//! Inputs are uploaded at most once (`Tensor::device_or_upload` caches the
//! copy on the tensor); outputs stay on the device (`Tensor::from_device`)
//! until something reads them on the host, which downloads them once. All
//! work is queued on one stream, so a method returns as soon as its kernels
//! are queued: call [`CudaBackend::synchronize`] before reading a host clock.

use std::any::Any;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::backend::reference::split_axis;
use crate::backend::{Backend, Binary, ConvArgs, InputMask, PairResidual, ReferenceBackend, Unary};
use crate::error::{Error, Result};
use crate::shape::reduced_shape;
use crate::tensor::{Float, Tensor};

use super::device::{CudaFloat, Device};
use super::elementwise::{self, MaskRef};
use super::index::{BinaryPlan, SumPlan, broadcast_plan};
use super::{DeviceBuffer, conv, loss, reduce, softmax};

/// The CUDA backend (device 0). Cheap to clone: every instance shares the
/// process's device state (context, stream, cuBLAS handle, kernels).
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.dev.name())
    }
}

impl CudaBackend {
    /// Open device 0. `Error::BackendUnavailable` (never a panic) when the
    /// CUDA driver, NVRTC or cuBLAS cannot be loaded or no device exists.
    /// The kernels are compiled on first use of each element type.
    pub fn new() -> Result<Self> {
        Ok(CudaBackend {
            dev: Device::get()?,
        })
    }

    /// Wait for every queued kernel, copy and GEMM to finish.
    ///
    /// Backend methods only queue work, so host-side timing must bracket the
    /// measured calls with `synchronize()`; it also surfaces asynchronous
    /// launch failures as an error. (Reading a result on the host, e.g.
    /// `Tensor::as_slice` or `item`, synchronizes implicitly.)
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> String {
        self.dev.name().to_string()
    }

    /// Compile and load the kernels of `T` now rather than on first use
    /// (keeps NVRTC out of a timed region).
    pub fn warm_up<T: CudaFloat>(&self) -> Result<()> {
        self.dev.kernels::<T>().map(|_| ())
    }

    /// The device copy of `t`, uploading it on first use.
    fn dev<'a, T: CudaFloat>(&self, t: &'a Tensor<T>) -> Result<&'a CudaSlice<T>> {
        let buf = t.device_or_upload(|host| {
            Ok(Box::new(DeviceBuffer {
                slice: self.dev.upload(host)?,
                stream: self.dev.stream.clone(),
            }))
        })?;
        let any: &dyn Any = buf;
        any.downcast_ref::<DeviceBuffer<T>>()
            .map(|b| &b.slice)
            .ok_or_else(|| {
                Error::Device("the tensor's device copy belongs to another device backend".into())
            })
    }

    fn wrap<T: CudaFloat>(&self, shape: &[usize], slice: CudaSlice<T>) -> Tensor<T> {
        Tensor::from_device(
            shape,
            Box::new(DeviceBuffer {
                slice,
                stream: self.dev.stream.clone(),
            }),
        )
    }

    fn mask<'a, T: CudaFloat>(
        &self,
        m: &'a Option<InputMask<T>>,
    ) -> Result<Option<MaskRef<'a, T>>> {
        Ok(match m {
            None => None,
            Some(InputMask::Spatial(t)) => Some(MaskRef::Spatial(self.dev(t)?)),
            Some(InputMask::Channel(t)) => Some(MaskRef::Channel(self.dev(t)?)),
        })
    }
}

/// `[N, C, H*W]` of a 4-d tensor.
fn nc_hw<T: Float>(x: &Tensor<T>, what: &'static str) -> Result<[usize; 3]> {
    let [n, c, h, w] = x.dims4(what)?;
    Ok([n, c, h * w])
}

// Empty tensors never reach a kernel (a zero-block launch is an error and
// there is nothing to compute): those calls, and shapes whose index
// descriptors would exceed `MAX_RANK` dims after coalescing, run on the
// reference backend and return host tensors. The op layer rejects empty
// operands of every op the losses use, so this is an edge path.
impl<T: CudaFloat> Backend<T> for CudaBackend {
    fn name(&self) -> String {
        "cuda".into()
    }

    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let bias = b.map(|b| self.dev(b)).transpose()?;
        let y = conv::forward(
            &self.dev,
            [self.dev(x)?, self.dev(w)?],
            bias,
            self.mask(&args.mask)?,
            g,
            args.relu,
        )?;
        Ok(self.wrap(&g.output_shape(), y))
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let dx = conv::backward_input(
            &self.dev,
            self.dev(dy)?,
            self.dev(w)?,
            self.mask(&args.mask)?,
            g,
        )?;
        Ok(self.wrap(&g.input_shape(), dx))
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        let g = &args.geom;
        let dw = conv::backward_weight(
            &self.dev,
            self.dev(dy)?,
            self.dev(x)?,
            self.mask(&args.mask)?,
            g,
        )?;
        Ok(self.wrap(&g.weight_shape(), dw))
    }

    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>> {
        let [_, c, _, _] = dy.dims4("conv2d_backward_bias")?;
        self.sum_axes(dy, &[0, 2, 3])?.reshape(&[c])
    }

    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>> {
        if x.numel() == 0 {
            return ReferenceBackend.unary(op, x);
        }
        let y = elementwise::unary(&self.dev, op, self.dev(x)?)?;
        Ok(self.wrap(x.shape(), y))
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        if x.numel() == 0 {
            return ReferenceBackend.unary_backward(op, x, y, dy);
        }
        let dx =
            elementwise::unary_backward(&self.dev, op, self.dev(x)?, self.dev(y)?, self.dev(dy)?)?;
        Ok(self.wrap(x.shape(), dx))
    }

    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        let n: usize = out_shape.iter().product();
        let plan = BinaryPlan::new(a.shape(), b.shape(), out_shape);
        let out = match plan {
            _ if n == 0 => return ReferenceBackend.binary(op, a, b, out_shape),
            None => return ReferenceBackend.binary(op, a, b, out_shape),
            Some(BinaryPlan::Same) => {
                elementwise::binary_same(&self.dev, op, self.dev(a)?, self.dev(b)?, n)?
            }
            Some(BinaryPlan::Strided(s)) => {
                elementwise::binary_bcast(&self.dev, op, self.dev(a)?, self.dev(b)?, &s, n)?
            }
        };
        Ok(self.wrap(out_shape, out))
    }

    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>> {
        if x.numel() == 0 {
            return ReferenceBackend.mask_mul(x, mask);
        }
        let m = match mask {
            InputMask::Spatial(t) => MaskRef::Spatial(self.dev(t)?),
            InputMask::Channel(t) => MaskRef::Channel(self.dev(t)?),
        };
        let y = elementwise::mask_mul(&self.dev, self.dev(x)?, m, nc_hw(x, "mask_mul")?)?;
        Ok(self.wrap(x.shape(), y))
    }

    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>> {
        let out_shape = reduced_shape(x.shape(), axes);
        let plan = SumPlan::new(x.shape(), axes);
        match plan {
            Some(plan) if x.numel() > 0 => {
                let out = reduce::sum_axes(&self.dev, self.dev(x)?, &plan)?;
                Ok(self.wrap(&out_shape, out))
            }
            _ => ReferenceBackend.sum_axes(x, axes),
        }
    }

    fn broadcast_to(&self, x: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
        let n: usize = shape.iter().product();
        match broadcast_plan(x.shape(), shape) {
            Some(plan) if n > 0 && x.numel() > 0 => {
                let out = elementwise::strided_copy(&self.dev, self.dev(x)?, &plan, n)?;
                Ok(self.wrap(shape, out))
            }
            _ => ReferenceBackend.broadcast_to(x, shape),
        }
    }

    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        if x.numel() == 0 {
            return ReferenceBackend.softmax(x, axis);
        }
        let (outer, len, inner) = split_axis(x.shape(), axis);
        let y = softmax::softmax(&self.dev, self.dev(x)?, [outer, len, inner])?;
        Ok(self.wrap(x.shape(), y))
    }

    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        if y.numel() == 0 {
            return ReferenceBackend.softmax_backward(y, dy, axis);
        }
        let (outer, len, inner) = split_axis(y.shape(), axis);
        let dx =
            softmax::softmax_backward(&self.dev, self.dev(y)?, self.dev(dy)?, [outer, len, inner])?;
        Ok(self.wrap(y.shape(), dx))
    }

    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>> {
        let (outer, full, inner) = split_axis(x.shape(), axis);
        if outer * len * inner == 0 {
            return ReferenceBackend.narrow(x, axis, start, len);
        }
        let y = elementwise::narrow(&self.dev, self.dev(x)?, [outer, full, inner], start, len)?;
        let mut shape = x.shape().to_vec();
        shape[axis] = len;
        Ok(self.wrap(&shape, y))
    }

    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        shape: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>> {
        let (outer, full, inner) = split_axis(shape, axis);
        let len = dy.shape()[axis];
        if outer * len * inner == 0 || dy.numel() == 0 {
            return ReferenceBackend.narrow_backward(dy, shape, axis, start);
        }
        let out = elementwise::narrow_backward(
            &self.dev,
            self.dev(dy)?,
            [outer, full, inner],
            start,
            len,
        )?;
        Ok(self.wrap(shape, out))
    }

    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
        if a.numel() == 0 {
            return ReferenceBackend.sq_err_sum(a, b);
        }
        let s = loss::sq_err_sum(&self.dev, self.dev(a)?, self.dev(b)?)?;
        Ok(self.wrap(&[], s))
    }

    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>> {
        if a.numel() == 0 {
            return ReferenceBackend.sq_err_backward(a, b, g);
        }
        let out = loss::sq_err_grad(&self.dev, self.dev(a)?, self.dev(b)?, g + g)?;
        Ok(self.wrap(a.shape(), out))
    }

    fn weighted_pair_residual(
        &self,
        a: &Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        if a.numel() == 0 {
            return ReferenceBackend.weighted_pair_residual(a, b, wa, wb, t);
        }
        let (r, sums) = loss::wpair_residual(
            &self.dev,
            [self.dev(a)?, self.dev(b)?, self.dev(t)?],
            wa,
            wb,
        )?;
        let sums = self.dev.download(&sums)?;
        Ok(PairResidual {
            residual: self.wrap(a.shape(), r),
            sq_sum: sums[0],
            dot_a: sums[1],
            dot_b: sums[2],
        })
    }
}
