//! Host side of `kernels/elementwise.cu`: unary functions and derivatives,
//! broadcasting binary ops, masks, layout copies, the conv epilogue.
//!
//! Every wrapper allocates its output with `Device::alloc` (uninitialised)
//! and launches a grid-stride kernel that writes each output element once,
//! so the output is fully written before anything can read it.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::backend::{Binary, Unary};
use crate::error::Result;

use super::device::{CudaFloat, Device, check_len, driver_err, elem_cfg, i64_of};
use super::index::{Strided, Strided2};
use super::kernels::Kernel;

/// Op code and scalar argument of a unary function (codes match `U_*` in
/// the kernel source). The scalar is rounded to `T` on the host, exactly as
/// the reference backend's `T::from_f64(c)`.
fn unary_code<T: CudaFloat>(op: Unary) -> (i32, T) {
    let zero = T::zero();
    match op {
        Unary::Relu => (0, zero),
        Unary::Abs => (1, zero),
        Unary::Neg => (2, zero),
        Unary::Exp => (3, zero),
        Unary::Ln => (4, zero),
        Unary::Sqrt => (5, zero),
        Unary::Recip => (6, zero),
        Unary::Square => (7, zero),
        Unary::Scale(c) => (8, T::from_f64(c)),
        Unary::AddScalar(c) => (9, T::from_f64(c)),
    }
}

/// Op code of a binary op (matches `binary_apply`).
fn binary_code(op: Binary) -> i32 {
    match op {
        Binary::Add => 0,
        Binary::Sub => 1,
        Binary::Mul => 2,
        Binary::Div => 3,
    }
}

/// A constant input mask on the device.
#[derive(Clone, Copy)]
pub(crate) enum MaskRef<'a, T> {
    /// `m[n, h*w]`
    Spatial(&'a CudaSlice<T>),
    /// `m[n, c]`
    Channel(&'a CudaSlice<T>),
}

impl<'a, T> MaskRef<'a, T> {
    pub(crate) fn slice(&self) -> &'a CudaSlice<T> {
        match *self {
            MaskRef::Spatial(m) | MaskRef::Channel(m) => m,
        }
    }
    /// `kind` of the element-wise mask kernels.
    fn elementwise_kind(&self) -> i32 {
        match self {
            MaskRef::Spatial(_) => 0,
            MaskRef::Channel(_) => 1,
        }
    }
    /// `mask_kind` of `ConvGeom` (0 is "no mask").
    pub(crate) fn conv_kind(&self) -> i64 {
        match self {
            MaskRef::Spatial(_) => 1,
            MaskRef::Channel(_) => 2,
        }
    }
    /// Error unless the mask covers an `[n, c, h*w]` input.
    pub(crate) fn check(&self, n: usize, c: usize, hw: usize) -> Result<()> {
        match self {
            MaskRef::Spatial(m) => check_len("spatial mask", m.len(), n * hw),
            MaskRef::Channel(m) => check_len("channel mask", m.len(), n * c),
        }
    }
}

pub(crate) fn unary<T: CudaFloat>(
    dev: &Device,
    op: Unary,
    x: &CudaSlice<T>,
) -> Result<CudaSlice<T>> {
    let n = x.len();
    let (code, c) = unary_code::<T>(op);
    let mut y = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::UnaryFwd);
    let mut b = dev.stream.launch_builder(f);
    b.arg(x).arg(&mut y).arg(&n64).arg(&code).arg(&c);
    // SAFETY: unary_fwd(const T* x, T* y, i64 n, int op, T c): five
    // arguments of exactly these types, in order; x and y hold n elements.
    unsafe { b.launch(elem_cfg(n)) }.map_err(driver_err("unary_fwd"))?;
    Ok(y)
}

pub(crate) fn unary_backward<T: CudaFloat>(
    dev: &Device,
    op: Unary,
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dy: &CudaSlice<T>,
) -> Result<CudaSlice<T>> {
    let n = x.len();
    check_len("unary_backward y", y.len(), n)?;
    check_len("unary_backward dy", dy.len(), n)?;
    let (code, c) = unary_code::<T>(op);
    let mut dx = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::UnaryBwd);
    let mut b = dev.stream.launch_builder(f);
    b.arg(x)
        .arg(y)
        .arg(dy)
        .arg(&mut dx)
        .arg(&n64)
        .arg(&code)
        .arg(&c);
    // SAFETY: unary_bwd(const T* x, const T* y, const T* dy, T* dx, i64 n,
    // int op, T c): seven arguments of these types in order; every buffer
    // holds at least n elements (checked above, dx allocated with n).
    unsafe { b.launch(elem_cfg(n)) }.map_err(driver_err("unary_bwd"))?;
    Ok(dx)
}

/// `a op b` over `n` output elements, both operands of the output's layout.
pub(crate) fn binary_same<T: CudaFloat>(
    dev: &Device,
    op: Binary,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    n: usize,
) -> Result<CudaSlice<T>> {
    check_len("binary a", a.len(), n)?;
    check_len("binary b", b.len(), n)?;
    let code = binary_code(op);
    let mut out = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::BinarySame);
    let mut l = dev.stream.launch_builder(f);
    l.arg(a).arg(b).arg(&mut out).arg(&n64).arg(&code);
    // SAFETY: binary_same(const T* a, const T* b, T* out, i64 n, int op):
    // five arguments in order; a, b and out hold at least n elements.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("binary_same"))?;
    Ok(out)
}

/// `a op b` with broadcasting described by `s` (`n` output elements; the
/// descriptor's offsets stay inside each operand's own shape).
pub(crate) fn binary_bcast<T: CudaFloat>(
    dev: &Device,
    op: Binary,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    s: &Strided2,
    n: usize,
) -> Result<CudaSlice<T>> {
    let code = binary_code(op);
    let mut out = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::BinaryBcast);
    let mut l = dev.stream.launch_builder(f);
    l.arg(a).arg(b).arg(&mut out).arg(&n64).arg(&code).arg(s);
    // SAFETY: binary_bcast(const T* a, const T* b, T* out, i64 n, int op,
    // Strided2 s): six arguments in order, `Strided2` passed by value with the
    // C layout; the descriptor comes from `BinaryPlan::new` on the operands'
    // own shapes, so every offset it yields is inside a and b.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("binary_bcast"))?;
    Ok(out)
}

/// `out[i] = x[s.offset(i)]` for `n` outputs (broadcast_to).
pub(crate) fn strided_copy<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    s: &Strided,
    n: usize,
) -> Result<CudaSlice<T>> {
    let mut out = dev.alloc::<T>(n)?;
    let n64 = i64_of(n);
    let f = dev.kernels::<T>()?.get(Kernel::StridedCopy);
    let mut l = dev.stream.launch_builder(f);
    l.arg(x).arg(&mut out).arg(&n64).arg(s);
    // SAFETY: strided_copy(const T* x, T* out, i64 n, Strided s): four
    // arguments in order; the descriptor comes from `broadcast_plan` on x's
    // own shape, so its offsets stay inside x; out holds n elements.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("strided_copy"))?;
    Ok(out)
}

/// `x * m` for x of shape `[n, c, hw]`.
pub(crate) fn mask_mul<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    mask: MaskRef<'_, T>,
    [n, c, hw]: [usize; 3],
) -> Result<CudaSlice<T>> {
    let total = n * c * hw;
    check_len("mask_mul x", x.len(), total)?;
    mask.check(n, c, hw)?;
    let mut y = dev.alloc::<T>(total)?;
    let (t64, c64, hw64, kind) = (
        i64_of(total),
        i64_of(c),
        i64_of(hw),
        mask.elementwise_kind(),
    );
    let f = dev.kernels::<T>()?.get(Kernel::MaskMul);
    let mut l = dev.stream.launch_builder(f);
    l.arg(x)
        .arg(mask.slice())
        .arg(&mut y)
        .arg(&t64)
        .arg(&c64)
        .arg(&hw64)
        .arg(&kind);
    // SAFETY: mask_mul(const T* x, const T* m, T* y, i64 n, i64 c, i64 hw,
    // int kind): seven arguments in order; x and y hold n*c*hw elements and
    // the mask n*hw (spatial) or n*c (channel), checked above.
    unsafe { l.launch(elem_cfg(total)) }.map_err(driver_err("mask_mul"))?;
    Ok(y)
}

/// `y *= m` in place, for y of shape `[n, c, hw]`.
pub(crate) fn mask_mul_inplace<T: CudaFloat>(
    dev: &Device,
    y: &mut CudaSlice<T>,
    mask: MaskRef<'_, T>,
    [n, c, hw]: [usize; 3],
) -> Result<()> {
    let total = n * c * hw;
    check_len("mask_mul_inplace y", y.len(), total)?;
    mask.check(n, c, hw)?;
    let (t64, c64, hw64, kind) = (
        i64_of(total),
        i64_of(c),
        i64_of(hw),
        mask.elementwise_kind(),
    );
    let f = dev.kernels::<T>()?.get(Kernel::MaskMulInplace);
    let mut l = dev.stream.launch_builder(f);
    l.arg(y)
        .arg(mask.slice())
        .arg(&t64)
        .arg(&c64)
        .arg(&hw64)
        .arg(&kind);
    // SAFETY: mask_mul_inplace(T* y, const T* m, i64 n, i64 c, i64 hw, int
    // kind): six arguments in order; sizes checked above.
    unsafe { l.launch(elem_cfg(total)) }.map_err(driver_err("mask_mul_inplace"))?;
    Ok(())
}

/// The conv epilogue in place: `y = act(y + b[c])` for y `[n, c, hw]`.
/// `bias` None skips the add; `any` is any valid device pointer of the
/// right type, passed in the bias slot when there is no bias (never read).
pub(crate) fn bias_act<T: CudaFloat>(
    dev: &Device,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    any: &CudaSlice<T>,
    [n, c, hw]: [usize; 3],
    relu: bool,
) -> Result<()> {
    let total = n * c * hw;
    check_len("bias_act y", y.len(), total)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), c)?;
    }
    let (t64, c64, hw64) = (i64_of(total), i64_of(c), i64_of(hw));
    let (has_bias, relu) = (i32::from(bias.is_some()), i32::from(relu));
    let f = dev.kernels::<T>()?.get(Kernel::BiasAct);
    let mut l = dev.stream.launch_builder(f);
    l.arg(y)
        .arg(bias.unwrap_or(any))
        .arg(&t64)
        .arg(&c64)
        .arg(&hw64)
        .arg(&has_bias)
        .arg(&relu);
    // SAFETY: bias_act(T* y, const T* b, i64 n, i64 c, i64 hw, int has_bias,
    // int relu): seven arguments in order; y holds n*c*hw elements and b at
    // least c when has_bias (checked above), b is not read otherwise.
    unsafe { l.launch(elem_cfg(total)) }.map_err(driver_err("bias_act"))?;
    Ok(())
}

/// x viewed as `[outer, full, inner]` -> `[outer, len, inner]` at `start`.
pub(crate) fn narrow<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    [outer, full, inner]: [usize; 3],
    start: usize,
    len: usize,
) -> Result<CudaSlice<T>> {
    check_len("narrow x", x.len(), outer * full * inner)?;
    if start + len > full {
        return Err(crate::error::Error::Device(
            "narrow slice out of range".into(),
        ));
    }
    let n = outer * len * inner;
    let mut y = dev.alloc::<T>(n)?;
    let (n64, full64, inner64, start64, len64) = (
        i64_of(n),
        i64_of(full),
        i64_of(inner),
        i64_of(start),
        i64_of(len),
    );
    let f = dev.kernels::<T>()?.get(Kernel::NarrowCopy);
    let mut l = dev.stream.launch_builder(f);
    l.arg(x)
        .arg(&mut y)
        .arg(&n64)
        .arg(&full64)
        .arg(&inner64)
        .arg(&start64)
        .arg(&len64);
    // SAFETY: narrow_copy(const T* x, T* y, i64 n, i64 full, i64 inner, i64
    // start, i64 len): seven arguments in order; y holds n = outer*len*inner
    // and x outer*full*inner elements with start + len <= full (checked).
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("narrow_copy"))?;
    Ok(y)
}

/// The adjoint of `narrow`: zeros of `[outer, full, inner]` with dy at `start`.
pub(crate) fn narrow_backward<T: CudaFloat>(
    dev: &Device,
    dy: &CudaSlice<T>,
    [outer, full, inner]: [usize; 3],
    start: usize,
    len: usize,
) -> Result<CudaSlice<T>> {
    check_len("narrow_backward dy", dy.len(), outer * len * inner)?;
    if start + len > full {
        return Err(crate::error::Error::Device(
            "narrow slice out of range".into(),
        ));
    }
    let n = outer * full * inner;
    let mut out = dev.alloc::<T>(n)?;
    let (n64, full64, inner64, start64, len64) = (
        i64_of(n),
        i64_of(full),
        i64_of(inner),
        i64_of(start),
        i64_of(len),
    );
    let f = dev.kernels::<T>()?.get(Kernel::NarrowScatter);
    let mut l = dev.stream.launch_builder(f);
    l.arg(dy)
        .arg(&mut out)
        .arg(&n64)
        .arg(&full64)
        .arg(&inner64)
        .arg(&start64)
        .arg(&len64);
    // SAFETY: narrow_scatter(const T* dy, T* out, i64 n, i64 full, i64
    // inner, i64 start, i64 len): seven arguments in order; out holds n
    // elements, dy outer*len*inner (checked), start + len <= full.
    unsafe { l.launch(elem_cfg(n)) }.map_err(driver_err("narrow_scatter"))?;
    Ok(out)
}

/// `out[i] = sum_s partial[s * len + i]` in sample order.
pub(crate) fn sum_samples<T: CudaFloat>(
    dev: &Device,
    partial: &CudaSlice<T>,
    samples: usize,
    len: usize,
) -> Result<CudaSlice<T>> {
    check_len("sum_samples partials", partial.len(), samples * len)?;
    let mut out = dev.alloc::<T>(len)?;
    let (s64, len64) = (i64_of(samples), i64_of(len));
    let f = dev.kernels::<T>()?.get(Kernel::SumSamples);
    let mut l = dev.stream.launch_builder(f);
    l.arg(partial).arg(&mut out).arg(&s64).arg(&len64);
    // SAFETY: sum_samples(const T* partial, T* out, i64 samples, i64 len):
    // four arguments in order; partial holds samples*len elements (checked)
    // and out len.
    unsafe { l.launch(elem_cfg(len)) }.map_err(driver_err("sum_samples"))?;
    Ok(out)
}
