//! The seam between math and kernels.
//!
//! Ops (`crate::ops`) validate shapes, build the autodiff graph and state
//! each derivative; a `Backend` only computes arrays. A new backend
//! implements this trait and touches nothing above `backend/`.
//!
//! Inputs reaching a backend are already validated by the op layer (shapes
//! fit, axes in range), so kernels may assume them.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;
pub mod reference;

pub use cpu::{ConvAlgo, CpuBackend, Isa};
pub use profile::{ProfileRow, Profiled};
pub use reference::ReferenceBackend;

/// Element-wise functions of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// `max(x, 0)`
    Relu,
    /// `|x|`
    Abs,
    /// `-x`
    Neg,
    /// `e^x`
    Exp,
    /// Natural logarithm.
    Ln,
    /// Square root.
    Sqrt,
    /// `1 / x`
    Recip,
    /// `x^2`
    Square,
    /// `c * x`
    Scale(f64),
    /// `x + c`
    AddScalar(f64),
}

/// Element-wise functions of two tensors, with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
}

/// A constant 0/1 (or any real) multiplier applied to a conv input before
/// the convolution: `x * m` broadcast over channels (spatial) or over
/// positions (channel). Backends may exploit exact zeros to skip work.
#[derive(Clone, Debug)]
pub enum InputMask<T: Float> {
    /// `m[n, h, w]`, shape `[N, H, W]`.
    Spatial(Tensor<T>),
    /// `m[n, c]`, shape `[N, C]`.
    Channel(Tensor<T>),
}

impl<T: Float> InputMask<T> {
    /// The multipliers, `[N, H, W]` or `[N, C]`.
    pub fn tensor(&self) -> &Tensor<T> {
        match self {
            InputMask::Spatial(t) | InputMask::Channel(t) => t,
        }
    }

    /// The same mask in another precision ([`Tensor::cast`] of its multipliers).
    pub fn cast<U: Float>(&self) -> InputMask<U> {
        match self {
            InputMask::Spatial(t) => InputMask::Spatial(t.cast()),
            InputMask::Channel(t) => InputMask::Channel(t.cast()),
        }
    }

    /// The multiplier of element `[n, c, h, w]` of an `[N, C, H, W]` input.
    #[inline]
    pub fn value(&self, n: usize, c: usize, hw: usize, dims: [usize; 4]) -> T {
        let [_, cc, h, w] = dims;
        match self {
            InputMask::Spatial(m) => m.as_slice()[n * h * w + hw],
            InputMask::Channel(m) => m.as_slice()[n * cc + c],
        }
    }

    /// Check the mask's shape against an `[N, C, H, W]` input.
    pub fn check(&self, op: &'static str, x_dims: [usize; 4]) -> Result<()> {
        let [n, c, h, w] = x_dims;
        let (want, got) = match self {
            InputMask::Spatial(m) => (vec![n, h, w], m.shape()),
            InputMask::Channel(m) => (vec![n, c], m.shape()),
        };
        if got != want.as_slice() {
            return Err(Error::shape(
                op,
                format!("mask of shape {got:?} does not fit input {x_dims:?} (expected {want:?})"),
            ));
        }
        Ok(())
    }
}

/// Validated geometry of a 2-d convolution (NCHW input, OIHW weight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (rows, columns).
    pub stride: [usize; 2],
    /// Zero padding on each side (rows, columns).
    pub padding: [usize; 2],
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeometry {
    /// Check an input shape and a weight shape and compute the output size.
    pub fn new(
        x: &[usize],
        weight: &[usize],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Result<Self> {
        let [n, c_in, h, w] = <[usize; 4]>::try_from(x)
            .map_err(|_| Error::shape("conv2d", format!("input must be NCHW (4-d), got {x:?}")))?;
        let [c_out, wc_in, kh, kw] = <[usize; 4]>::try_from(weight).map_err(|_| {
            Error::shape(
                "conv2d",
                format!("weight must be [Cout, Cin, kh, kw], got {weight:?}"),
            )
        })?;
        if wc_in != c_in {
            return Err(Error::shape(
                "conv2d",
                format!("input has {c_in} channels but weight {weight:?} expects {wc_in}"),
            ));
        }
        if x.contains(&0) || weight.contains(&0) {
            return Err(Error::ZeroSized {
                what: format!("conv2d operand (input {x:?}, weight {weight:?})"),
                shape: if x.contains(&0) {
                    x.to_vec()
                } else {
                    weight.to_vec()
                },
            });
        }
        if stride.contains(&0) {
            return Err(Error::arg("conv2d", "stride must be at least 1"));
        }
        // (padded size, output size) along one axis.
        let span = |size: usize, pad: usize, k: usize, s: usize| -> Result<(usize, usize)> {
            let padded = pad
                .checked_mul(2)
                .and_then(|p| p.checked_add(size))
                .ok_or_else(|| Error::arg("conv2d", format!("padding {pad} is absurdly large")))?;
            if padded < k {
                return Err(Error::shape(
                    "conv2d",
                    format!("kernel {k} larger than padded input {padded}"),
                ));
            }
            Ok((padded, (padded - k) / s + 1))
        };
        let (hp, oh) = span(h, padding[0], kh, stride[0])?;
        let (wp, ow) = span(w, padding[1], kw, stride[1])?;
        // The output, and the padded input the kernels may copy, are refused
        // here if too large to allocate (not left to abort the process).
        crate::tensor::checked_numel(&[n, c_out, oh, ow])?;
        crate::tensor::checked_numel(&[n, c_in, hp, wp])?;
        Ok(ConvGeometry {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            oh,
            ow,
        })
    }

    /// `[N, Cin, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }
    /// `[Cout, Cin, kh, kw]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in, self.kh, self.kw]
    }
    /// `[N, Cout, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.oh, self.ow]
    }

    /// Multiply-adds of one pass (forward, input grad or weight grad).
    pub fn macs(&self) -> u64 {
        (self.n * self.c_out * self.oh * self.ow) as u64 * (self.c_in * self.kh * self.kw) as u64
    }

    /// True for the 3x3, stride 1, pad 1 "same" convolution.
    pub fn is_3x3_same(&self) -> bool {
        self.kh == 3 && self.kw == 3 && self.stride == [1, 1] && self.padding == [1, 1]
    }
}

/// Everything a conv kernel needs besides its operands.
#[derive(Clone, Debug)]
pub struct ConvArgs<T: Float> {
    /// Shapes, stride and padding.
    pub geom: ConvGeometry,
    /// Multiplier applied to the input before the convolution.
    pub mask: Option<InputMask<T>>,
    /// Apply ReLU to the output (forward only; the op layer handles its derivative).
    pub relu: bool,
}

/// The kernels behind the ops. One implementation per device / strategy.
///
/// A method added here must also be forwarded by `forward_to_kernels!` in
/// `cpu/mod.rs` (`CpuBackend`'s impls for f32 and f64 forward each method
/// to its generic impl): one without a default fails to compile until it
/// is, but one with a default would quietly run the default on the CPU
/// backend.
pub trait Backend<T: Float>: Send + Sync {
    /// A short name: `reference`, `cpu`, `cuda`.
    fn name(&self) -> String;

    // ---- convolution ---------------------------------------------------
    /// `y = act(conv(x * mask, w) + b)`.
    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>>;
    /// Gradient with respect to `x` (not `x * mask`): `mask * conv_transpose(dy, w)`.
    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>>;
    /// Gradient with respect to `w`: correlation of `dy` with `x * mask`.
    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>>;
    /// Gradient with respect to the bias: `dy` summed over N, H, W.
    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>>;
    /// `base + conv2d(x, w, b)` for a `base` of the output's shape that the
    /// caller gives up: a backend may write the conv's outputs straight
    /// into `base`'s buffer, each `base + y` one add as [`binary`](Self::binary)
    /// rounds it (the same values; no conv output to allocate and page
    /// in, no second pass). The default adds a separate conv's output.
    fn conv2d_add(
        &self,
        base: Tensor<T>,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        conv2d_add_separately(self, base, x, w, b, args)
    }

    // ---- element-wise ----------------------------------------------------
    /// `op` applied to every element.
    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>>;
    /// `dy * f'(x)`; `y = f(x)` is passed too since some derivatives read it.
    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>>;
    /// `a op b` with broadcasting to `out_shape` (already validated).
    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>>;
    /// [`unary`](Self::unary) of a tensor the caller gives up: a backend
    /// may write the result into `x`'s buffer when nothing else holds it
    /// (same values; one big buffer less to allocate and page in).
    fn unary_owned(&self, op: Unary, x: Tensor<T>) -> Result<Tensor<T>> {
        self.unary(op, &x)
    }
    /// [`unary_backward`](Self::unary_backward) of a `dy` the caller gives
    /// up, which may hold the result (as [`unary_owned`](Self::unary_owned)).
    fn unary_backward_owned(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: Tensor<T>,
    ) -> Result<Tensor<T>> {
        self.unary_backward(op, x, y, &dy)
    }
    /// [`binary`](Self::binary) with an `a` the caller gives up, which may
    /// hold the result (as [`unary_owned`](Self::unary_owned)); the CPU
    /// backend does so where `a` and `b` both have `out_shape`.
    fn binary_owned(
        &self,
        op: Binary,
        a: Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        self.binary(op, &a, b, out_shape)
    }
    /// `x * mask` broadcast as `InputMask` describes.
    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>>;

    // ---- reductions and layout -------------------------------------------
    /// Sum over `axes`, keeping them as size-1 dims.
    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>>;
    /// Repeat `x` along its size-1 (or missing leading) dims up to `shape`.
    fn broadcast_to(&self, x: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>>;
    /// Numerically stable softmax along `axis` (max subtracted).
    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>>;
    /// `y * (dy - sum(dy * y, axis))`.
    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>>;
    /// Copy of the slice `start..start+len` along `axis`.
    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>>;
    /// Zeros of `shape` with `x` written at `start` along `axis` (the adjoint of `narrow`).
    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        shape: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>>;

    // ---- losses ------------------------------------------------------------
    /// `sum((a - b)^2)` as a rank-0 tensor.
    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>>;
    /// `2 * g * (a - b)`, the gradient of `g * sum((a - b)^2)` with respect to `a`.
    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>>;

    /// DMKD's fusion and loss in one pass: the residual
    /// `r = ((wa * a) + (wb * b)) - t` (rounded in that order, element by
    /// element) and the three sums the loss and its backward pass need,
    /// `sum(r^2)`, `<r, a>` and `<r, b>`. The fused feature `wa a + wb b` is
    /// never stored, and the backward pass needs `r` alone (`da = 2 g wa r`,
    /// `db = 2 g wb r`, `dt = -2 g r`, `dwa = 2 g <r, a>`, `dwb = 2 g <r, b>`),
    /// so `a` and `b` can be freed as soon as this returns. The default
    /// composes other kernels (the reference's order); a backend may fuse it.
    fn weighted_pair_residual(
        &self,
        a: &Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        let shape = a.shape();
        let fused = self.binary(
            Binary::Add,
            &self.unary(Unary::Scale(wa.as_f64()), a)?,
            &self.unary(Unary::Scale(wb.as_f64()), b)?,
            shape,
        )?;
        let sq_sum = self.sq_err_sum(&fused, t)?.item()?;
        let residual = self.binary(Binary::Sub, &fused, t, shape)?;
        drop(fused);
        let all: Vec<usize> = (0..shape.len()).collect();
        let dot = |x: &Tensor<T>| -> Result<T> {
            let p = self.binary(Binary::Mul, &residual, x, shape)?;
            if all.is_empty() {
                p.item()
            } else {
                self.sum_axes(&p, &all)?.item()
            }
        };
        let (dot_a, dot_b) = (dot(a)?, dot(b)?);
        Ok(PairResidual {
            residual,
            sq_sum,
            dot_a,
            dot_b,
        })
    }
    /// [`Backend::weighted_pair_residual`] of an `a` the caller gives up:
    /// the residual may be written into `a`'s buffer (the CPU backend does
    /// where `a` is the only handle on it: one activation-sized buffer less
    /// to allocate). The default borrows.
    fn weighted_pair_residual_owned(
        &self,
        a: Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        self.weighted_pair_residual(&a, b, wa, wb, t)
    }
}

/// What [`Backend::weighted_pair_residual`] returns.
#[derive(Clone, Debug)]
pub struct PairResidual<T: Float> {
    /// `r = ((wa * a) + (wb * b)) - t`, the shape of `a`.
    pub residual: Tensor<T>,
    /// `sum(r^2)`, the loss before scaling.
    pub sq_sum: T,
    /// `<r, a>` (half of `d sum(r^2) / d wa`).
    pub dot_a: T,
    /// `<r, b>`.
    pub dot_b: T,
}

/// A shared handle to a backend.
pub type BackendRef<T> = Arc<dyn Backend<T>>;

/// Which backend to build (the CLI's `--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Plain loops in the textbook order: the oracle.
    Reference,
    /// SIMD, multi-threaded, bit-deterministic CPU kernels.
    Cpu,
    /// The CUDA backend (feature `cuda`).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" | "ref" => Ok(BackendKind::Reference),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(Error::arg(
                "backend",
                format!("unknown backend `{other}` (reference, cpu or cuda)"),
            )),
        }
    }
}

/// Options for building a backend.
#[derive(Clone, Copy, Debug)]
pub struct BackendOptions {
    /// Which backend.
    pub kind: BackendKind,
    /// The CPU backend's convolution algorithm.
    pub conv_algo: ConvAlgo,
    /// The CPU backend's instruction set (`Auto`: the widest this CPU has).
    pub isa: Isa,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            kind: BackendKind::Cpu,
            conv_algo: ConvAlgo::Auto,
            isa: Isa::Auto,
        }
    }
}

/// Element types every backend supports; lets `make_backend` stay generic.
pub trait BackendFloat: Float {
    /// The backend `opts` describes, for this element type.
    fn make_backend(opts: BackendOptions) -> Result<BackendRef<Self>>;
}

fn make_host_backend<T: Float>(opts: BackendOptions) -> Option<Result<BackendRef<T>>>
where
    CpuBackend: Backend<T>,
{
    match opts.kind {
        BackendKind::Reference => Some(Ok(Arc::new(ReferenceBackend))),
        BackendKind::Cpu => Some(
            CpuBackend::with_isa(opts.conv_algo, opts.isa).map(|b| Arc::new(b) as BackendRef<T>),
        ),
        BackendKind::Cuda => None,
    }
}

macro_rules! impl_backend_float {
    ($t:ty) => {
        impl BackendFloat for $t {
            fn make_backend(opts: BackendOptions) -> Result<BackendRef<Self>> {
                opts.check()?;
                if let Some(b) = make_host_backend::<$t>(opts) {
                    return b;
                }
                #[cfg(feature = "cuda")]
                {
                    Ok(Arc::new(cuda::CudaBackend::new()?))
                }
                #[cfg(not(feature = "cuda"))]
                Err(Error::BackendUnavailable(
                    "this build has no CUDA support (rebuild with --features cuda)".into(),
                ))
            }
        }
    };
}
impl_backend_float!(f32);
impl_backend_float!(f64);

/// Build a backend for element type `T`.
pub fn make_backend<T: BackendFloat>(opts: BackendOptions) -> Result<BackendRef<T>> {
    T::make_backend(opts)
}

impl BackendOptions {
    /// Refuses options that the chosen backend would ignore: a
    /// convolution algorithm or an instruction set other than `Auto`
    /// means the CPU backend, and asking for either with the reference or
    /// the CUDA backend is an error rather than a silent no-op (a user who
    /// asked for `--backend reference --isa avx512` would otherwise believe
    /// that the AVX-512 kernels ran).
    pub fn check(&self) -> Result<()> {
        if self.kind == BackendKind::Cpu {
            return Ok(());
        }
        let backend = self.kind_name();
        let (option, why) = if self.conv_algo != ConvAlgo::Auto {
            (
                format!("conv algo `{}`", self.conv_algo),
                "has one algorithm",
            )
        } else if self.isa != Isa::Auto {
            (format!("isa `{}`", self.isa), "does not use it")
        } else {
            return Ok(());
        };
        Err(Error::arg(
            "backend",
            format!(
                "{option} applies to the cpu backend only; the {backend} backend {why} (leave it at auto)"
            ),
        ))
    }

    /// A short label, e.g. `cpu/auto`, `cpu/direct/avx2` (a named
    /// instruction set) or `reference`.
    pub fn kind_name(&self) -> String {
        match self.kind {
            BackendKind::Cpu if self.isa != Isa::Auto => {
                format!("cpu/{}/{}", self.conv_algo, self.isa)
            }
            BackendKind::Cpu => format!("cpu/{}", self.conv_algo),
            BackendKind::Reference => "reference".into(),
            BackendKind::Cuda => "cuda".into(),
        }
    }
}

/// `base + conv2d(x, w, b)` as two ops: the conv's output of its own, then
/// added into `base` ([`Backend::binary_owned`]). [`Backend::conv2d_add`]'s
/// default, and a backend's way where it cannot fuse the two.
pub(crate) fn conv2d_add_separately<T: Float, B: Backend<T> + ?Sized>(
    be: &B,
    base: Tensor<T>,
    x: &Tensor<T>,
    w: &Tensor<T>,
    b: Option<&Tensor<T>>,
    args: &ConvArgs<T>,
) -> Result<Tensor<T>> {
    let y = be.conv2d(x, w, b, args)?;
    let shape = y.shape().to_vec();
    be.binary_owned(Binary::Add, base, &y, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cpu option is accepted by the cpu backend; the other backends
    /// accept only `auto` for each, and name the option they refuse.
    #[test]
    fn cpu_options_are_refused_by_the_other_backends() {
        let algos = [
            ConvAlgo::Auto,
            ConvAlgo::Direct,
            ConvAlgo::Winograd,
            ConvAlgo::Winograd6,
        ];
        let isas = [Isa::Auto, Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];
        for kind in [BackendKind::Cpu, BackendKind::Reference, BackendKind::Cuda] {
            for conv_algo in algos {
                for isa in isas {
                    let opts = BackendOptions {
                        kind,
                        conv_algo,
                        isa,
                    };
                    let r = opts.check();
                    let plain = conv_algo == ConvAlgo::Auto && isa == Isa::Auto;
                    if kind == BackendKind::Cpu || plain {
                        assert!(r.is_ok(), "{opts:?}: {r:?}");
                        continue;
                    }
                    let msg = r.unwrap_err().to_string();
                    let name = match kind {
                        BackendKind::Reference => "reference",
                        _ => "cuda",
                    };
                    let want = match conv_algo {
                        ConvAlgo::Auto => format!(
                            "isa `{isa}` applies to the cpu backend only; the {name} backend does not use it"
                        ),
                        a => format!(
                            "conv algo `{a}` applies to the cpu backend only; the {name} backend has one algorithm"
                        ),
                    };
                    assert!(msg.contains(&want), "{opts:?}: {msg}");
                }
            }
        }
        // make_backend runs the check: the reference backend with a cpu
        // option is refused there too.
        let opts = BackendOptions {
            kind: BackendKind::Reference,
            conv_algo: ConvAlgo::Direct,
            isa: Isa::Auto,
        };
        assert!(make_backend::<f64>(opts).is_err());
        assert!(
            make_backend::<f32>(BackendOptions {
                conv_algo: ConvAlgo::Auto,
                ..opts
            })
            .is_ok()
        );
    }
}
