//! Tensors: a shape and row-major (NCHW) storage of f32 or f64. No math here.
//!
//! A `Tensor` is an immutable value, cheap to clone (the storage is shared
//! behind an `Arc`). Ops never write into their inputs; they return new
//! tensors. Views for the plain-loop reference code come from `ndarray`.
//!
//! Elements live in host memory, on a device, or both. Device memory is
//! whatever a device backend makes of it, behind [`DeviceStorage`]: this
//! module knows no backend.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use ndarray::{ArrayViewD, IxDyn};

use crate::error::{Error, Result};
use crate::pool::{self, PoolElem};

/// The element types the engine computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
}

impl DType {
    /// `"f32"` or `"f64"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }
    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "f64" => Ok(DType::F64),
            other => Err(Error::arg(
                "dtype",
                format!("unknown dtype `{other}` (f32 or f64)"),
            )),
        }
    }
}

/// A floating-point element type: f32 or f64 (the trait is sealed: its
/// buffer pool exists for these two only).
pub trait Float:
    num_traits::Float
    + PoolElem
    + ndarray::ScalarOperand
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Default
    + fmt::Debug
    + fmt::Display
    + fmt::LowerExp
    + Send
    + Sync
    + 'static
{
    /// The dtype tag of this type.
    const DTYPE: DType;
    /// Machine epsilon, as f64.
    const EPSILON_F64: f64;
    /// Conversion from f64 (rounding to nearest for f32).
    fn from_f64(x: f64) -> Self;
    /// Exact conversion to f64.
    fn as_f64(self) -> f64;
    /// Conversion from a count (exact below 2^24 for f32, 2^53 for f64).
    fn from_usize(x: usize) -> Self {
        <Self as Float>::from_f64(x as f64)
    }
    /// Little-endian bytes of a slice (the safetensors / npy byte order).
    fn to_le_bytes_vec(data: &[Self]) -> Vec<u8>;
    /// Parse little-endian bytes; `bytes.len()` must be a multiple of the size.
    fn from_le_bytes_vec(bytes: &[u8]) -> Vec<Self>;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    const EPSILON_F64: f64 = f32::EPSILON as f64;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn to_le_bytes_vec(data: &[Self]) -> Vec<u8> {
        data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn from_le_bytes_vec(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;
    const EPSILON_F64: f64 = f64::EPSILON;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
    fn to_le_bytes_vec(data: &[Self]) -> Vec<u8> {
        data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn from_le_bytes_vec(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    }
}

/// Upper bound on the number of elements of one tensor the engine will
/// allocate (2^34 elements, 64 GiB of f32). Sizes come from files and
/// configs; a lying header must be refused before any allocation.
pub const MAX_ELEMENTS: usize = 1 << 34;

/// Number of elements of a shape, refusing overflow and absurd sizes
/// (more than [`MAX_ELEMENTS`]). Where the dtype is not known (a shape
/// computed before any tensor exists), the error counts 4 bytes per
/// element, the smallest float held; [`checked_numel_sized`] counts a
/// known dtype's.
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    checked_numel_sized(shape, 4)
}

/// [`checked_numel`] for elements of `elem_bytes` bytes each: the bound
/// is the same number of elements, and the error reports bytes at that
/// size.
///
/// The bound applies to the product of the nonzero dims too: an empty
/// tensor of shape `[0, 2^40, 2^40]` holds nothing, but its strides and
/// index arithmetic would overflow.
pub fn checked_numel_sized(shape: &[usize], elem_bytes: usize) -> Result<usize> {
    let (mut n, mut span): (u128, u128) = (1, 1);
    for &d in shape {
        n = n.saturating_mul(d as u128);
        span = span.saturating_mul(d.max(1) as u128);
    }
    if span > MAX_ELEMENTS as u128 {
        return Err(Error::TooLarge {
            what: if n == 0 {
                format!("a tensor of shape {shape:?} (empty, but its other dims are that large)")
            } else {
                format!("a tensor of shape {shape:?}")
            },
            bytes: span.saturating_mul(elem_bytes as u128),
            limit: (MAX_ELEMENTS as u128) * elem_bytes as u128,
        });
    }
    Ok(n as usize)
}

/// [`checked_numel_sized`] at `T`'s size: what every tensor constructor checks.
fn checked_numel_of<T: Float>(shape: &[usize]) -> Result<usize> {
    checked_numel_sized(shape, std::mem::size_of::<T>())
}

/// Elements that live outside the engine's own buffers (a NumPy array, for
/// the Python package), read in place instead of copied.
///
/// The implementor keeps the memory alive and unchanged for as long as it
/// lives (tensors are immutable), and `as_slice` returns the same slice on
/// every call.
pub trait ExternalData<T>: Send + Sync {
    /// The elements, the same slice on every call.
    fn as_slice(&self) -> &[T];
}

/// Host elements: an engine buffer (recycled through the pool) or memory
/// owned elsewhere.
enum HostData<T: Float> {
    Owned(pool::Buffer<T>),
    External(Arc<dyn ExternalData<T>>),
}

impl<T: Float> HostData<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            HostData::Owned(b) => b.as_slice(),
            HostData::External(e) => e.as_slice(),
        }
    }
}

/// A tensor's elements in a device backend's memory.
///
/// The backend that makes one implements this trait for its own buffer
/// type and, to read it back in its kernels, downcasts the trait object to
/// that type (`as &dyn Any`). The tensor layer needs only the length and a
/// way to bring the elements to the host.
pub trait DeviceStorage<T>: Any + Send + Sync {
    /// Number of elements.
    fn numel(&self) -> usize;
    /// Copy the elements to the host (waiting for queued work to finish).
    fn download(&self) -> Result<Vec<T>>;
}

/// Where a tensor's elements live: in host memory, on a device, or both.
/// Each side is filled at most once and never changes (tensors are
/// immutable), so a copy made for one backend is cached for the next:
/// a device tensor read on the host is downloaded once, and a host tensor
/// read by a device backend is uploaded once.
struct Storage<T: Float> {
    host: OnceLock<HostData<T>>,
    device: OnceLock<Box<dyn DeviceStorage<T>>>,
}

impl<T: Float> Storage<T> {
    fn host(data: Vec<T>) -> Self {
        Self::from_host(HostData::Owned(pool::Buffer::new(data)))
    }

    fn from_host(data: HostData<T>) -> Self {
        let host = OnceLock::new();
        let _ = host.set(data);
        Storage {
            host,
            device: OnceLock::new(),
        }
    }
}

/// An immutable n-dimensional array in row-major order.
#[derive(Clone)]
pub struct Tensor<T: Float> {
    shape: Arc<[usize]>,
    numel: usize,
    data: Arc<Storage<T>>,
}

impl<T: Float> fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.as_slice();
        write!(f, "Tensor<{}>{:?}", T::DTYPE, self.shape)?;
        if d.len() <= 16 {
            write!(f, " {d:?}")
        } else {
            write!(f, " [{}, {}, ..., {}]", d[0], d[1], d[d.len() - 1])
        }
    }
}

impl<T: Float> Tensor<T> {
    /// A tensor from a shape and row-major data.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Result<Self> {
        let n = checked_numel_of::<T>(shape)?;
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!(
                    "shape {shape:?} holds {n} elements, data has {}",
                    data.len()
                ),
            ));
        }
        Ok(Self::from_parts(shape, data))
    }

    /// A tensor over elements owned elsewhere, read in place (no copy).
    /// The slice must hold exactly the shape's element count.
    pub fn from_external(shape: &[usize], data: Arc<dyn ExternalData<T>>) -> Result<Self> {
        let n = checked_numel_of::<T>(shape)?;
        let len = data.as_slice().len();
        if n != len {
            return Err(Error::shape(
                "Tensor::from_external",
                format!("shape {shape:?} holds {n} elements, data has {len}"),
            ));
        }
        Ok(Tensor {
            shape: shape.into(),
            numel: n,
            data: Arc::new(Storage::from_host(HostData::External(data))),
        })
    }

    /// Internal constructor; the caller guarantees `data.len() == numel(shape)`.
    pub(crate) fn from_parts(shape: &[usize], data: Vec<T>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape: shape.into(),
            numel: data.len(),
            data: Arc::new(Storage::host(data)),
        }
    }

    /// The elements as an owned vector, without a copy, when this tensor
    /// is the only handle on an engine buffer (no clone, no device copy,
    /// not external memory); otherwise the tensor back, untouched. How a
    /// backend writes a result into an operand the caller gives up
    /// (`Backend::unary_owned` and friends): tensors stay immutable,
    /// since no other handle can see the change.
    pub(crate) fn try_into_vec(mut self) -> std::result::Result<Vec<T>, Self> {
        let Some(s) = Arc::get_mut(&mut self.data) else {
            return Err(self);
        };
        if s.device.get().is_some() {
            return Err(self);
        }
        match s.host.take() {
            Some(HostData::Owned(buf)) => Ok(buf.into_vec()),
            other => {
                if let Some(h) = other {
                    let _ = s.host.set(h);
                }
                Err(self)
            }
        }
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: T) -> Result<Self> {
        let n = checked_numel_of::<T>(shape)?;
        let mut v = pool::take::<T>(n);
        v.fill(value);
        Ok(Self::from_parts(shape, v))
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::zero())
    }

    /// A tensor of ones.
    pub fn ones(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::one())
    }

    /// A rank-0 tensor.
    pub fn scalar(value: T) -> Self {
        Self::from_parts(&[], vec![value])
    }

    /// A tensor whose element at flat index `i` is `f(i)`.
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> T) -> Result<Self> {
        let n = checked_numel_of::<T>(shape)?;
        Ok(Self::from_parts(shape, (0..n).map(f).collect()))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The element type's tag.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// Row-major elements (a device tensor is downloaded once, then cached).
    ///
    /// # Panics
    /// When a device tensor's download fails: the device itself failed, not
    /// the input. Device kernels run asynchronously, so a kernel's fault
    /// surfaces at the first copy to the host; code that reads a device
    /// result first uses [`Tensor::try_as_slice`] (as [`Tensor::item`],
    /// [`Tensor::check_finite`] and so `distill::evaluate`, which checks
    /// every output it returns, do), after which this is the cached copy.
    pub fn as_slice(&self) -> &[T] {
        match self.try_as_slice() {
            Ok(s) => s,
            Err(e) => panic!("device-to-host copy failed: {e}"),
        }
    }

    /// Row-major elements, or the error of a failed download (a device
    /// fault, `Error::Device`); nothing is cached then, so a later read
    /// tries again rather than returning stale data.
    pub fn try_as_slice(&self) -> Result<&[T]> {
        if self.data.host.get().is_none() {
            let d = self
                .data
                .device
                .get()
                .expect("tensor invariant: host or device storage is set");
            let v = d.download()?;
            let _ = self.data.host.set(HostData::Owned(pool::Buffer::new(v)));
        }
        Ok(self
            .data
            .host
            .get()
            .expect("tensor invariant: host storage is set")
            .as_slice())
    }

    /// A tensor whose elements live in a device backend's memory; the
    /// caller guarantees `buf.numel()` equals the shape's element count.
    pub fn from_device(shape: &[usize], buf: Box<dyn DeviceStorage<T>>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), buf.numel());
        let device = OnceLock::new();
        let numel = buf.numel();
        let _ = device.set(buf);
        Tensor {
            shape: shape.into(),
            numel,
            data: Arc::new(Storage {
                host: OnceLock::new(),
                device,
            }),
        }
    }

    /// The device copy, made with `upload` from the host elements if absent
    /// (and then kept: the next call returns it without uploading).
    pub fn device_or_upload(
        &self,
        upload: impl FnOnce(&[T]) -> Result<Box<dyn DeviceStorage<T>>>,
    ) -> Result<&dyn DeviceStorage<T>> {
        if let Some(d) = self.data.device.get() {
            return Ok(&**d);
        }
        let d = upload(self.as_slice())?;
        let _ = self.data.device.set(d);
        Ok(&**self.data.device.get().expect("just set"))
    }

    /// True when the elements are on the host already (no download needed).
    pub fn is_on_host(&self) -> bool {
        self.data.host.get().is_some()
    }

    /// A copy of the row-major elements.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }

    /// An ndarray view, for readable reference code.
    pub fn view(&self) -> ArrayViewD<'_, T> {
        ArrayViewD::from_shape(IxDyn(&self.shape), self.as_slice())
            .expect("tensor invariant: data length equals the shape's element count")
    }

    /// The only element of a one-element tensor.
    pub fn item(&self) -> Result<T> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "Tensor::item",
                format!("tensor of shape {:?} is not a single value", self.shape),
            ));
        }
        Ok(self.try_as_slice()?[0])
    }

    /// The same data under another shape with the same element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n = checked_numel_of::<T>(shape)?;
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} as {shape:?}", self.shape),
            ));
        }
        Ok(Tensor {
            shape: shape.into(),
            numel: self.numel,
            data: self.data.clone(),
        })
    }

    /// Element-wise conversion to another float type.
    pub fn cast<U: Float>(&self) -> Tensor<U> {
        Tensor::from_parts(
            &self.shape,
            self.as_slice()
                .iter()
                .map(|&x| U::from_f64(x.as_f64()))
                .collect(),
        )
    }

    /// The four dimensions of an NCHW tensor, or a shape error naming `what`.
    pub fn dims4(&self, what: &'static str) -> Result<[usize; 4]> {
        match *self.shape {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::shape(
                what,
                format!("expected a 4-d NCHW tensor, got shape {:?}", self.shape),
            )),
        }
    }

    /// The first non-finite element, as (flat index, value).
    ///
    /// Every input is checked on every evaluation (a Python training loop
    /// passes features each step), so the scan must cost little next to the
    /// loss: a branch-free test per chunk vectorises, and only a chunk that
    /// fails is searched element by element. (Validating the retinanet
    /// preset's f32 features and parameters, 35M values, fell from 56 to 19 ms
    /// of CPU with it, about the time to read them from memory.) The chunks
    /// are scanned by the rayon pool, runs of 64 chunks per task, and the
    /// first failing chunk in index order wins (`find_map_first`), so the
    /// answer does not depend on the thread count.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        use rayon::prelude::*;
        const CHUNK: usize = 1024;
        self.as_slice()
            .par_chunks(CHUNK)
            .with_min_len(64)
            .enumerate()
            .find_map_first(|(c, chunk)| {
                if chunk.iter().fold(true, |ok, x| ok & x.is_finite()) {
                    return None;
                }
                let i = chunk.iter().position(|x| !x.is_finite())?;
                Some((c * CHUNK + i, chunk[i].as_f64()))
            })
    }

    /// Error unless every element is finite; the error names the tensor and
    /// the multi-index of the first bad element.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        // A device tensor's download error first, as an error.
        self.try_as_slice()?;
        match self.first_non_finite() {
            None => Ok(()),
            Some((i, value)) => Err(Error::NonFinite {
                tensor: name.to_string(),
                index: unravel(i, &self.shape),
                value,
            }),
        }
    }

    /// Error if any dimension is zero.
    pub fn check_nonempty(&self, name: &str) -> Result<()> {
        if self.shape.contains(&0) {
            return Err(Error::ZeroSized {
                what: name.to_string(),
                shape: self.shape.to_vec(),
            });
        }
        Ok(())
    }

    /// True when both tensors share the same storage (no copy was made).
    pub fn shares_storage(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }
}

/// Multi-index of flat index `i` in a row-major `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_length() {
        assert!(Tensor::<f32>::from_vec(&[2, 3], vec![0.0; 5]).is_err());
        let t = Tensor::<f32>::from_vec(&[2, 3], (0..6).map(|x| x as f32).collect()).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.view()[[1, 2]], 5.0);
    }

    #[test]
    fn absurd_sizes_are_refused_before_allocating() {
        let e = Tensor::<f32>::zeros(&[1 << 20, 1 << 20, 1 << 20]).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        let e = checked_numel(&[usize::MAX, usize::MAX]).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        // Empty, but the other dims multiply past the bound (strides overflow).
        let e = Tensor::<f32>::zeros(&[0, 1 << 40, 1 << 40]).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert!(e.to_string().contains("empty"), "{e}");
        assert_eq!(checked_numel(&[0, 1 << 17, 1 << 17]).unwrap(), 0);
        assert_eq!(checked_numel(&[1 << 17, 1 << 17]).unwrap(), 1 << 34);
        assert!(checked_numel(&[1 << 17, (1 << 17) + 1]).is_err());
        // The error counts the bytes of the dtype asked for.
        let bytes_of = |e: Error| match e {
            Error::TooLarge { bytes, limit, .. } => (bytes, limit),
            e => panic!("{e}"),
        };
        let over = [3usize, 1 << 33];
        let e = Tensor::<f64>::zeros(&over).unwrap_err();
        assert_eq!(bytes_of(e), (3 << 36, 1 << 37));
        let e = Tensor::<f32>::zeros(&over).unwrap_err();
        assert_eq!(bytes_of(e), (3 << 35, 1 << 36));
        assert_eq!(
            bytes_of(checked_numel(&over).unwrap_err()),
            (3 << 35, 1 << 36)
        );
    }

    #[test]
    fn check_finite_names_the_first_bad_index() {
        let t = Tensor::<f64>::from_vec(&[2, 2], vec![1.0, 2.0, f64::NAN, f64::INFINITY]).unwrap();
        match t.check_finite("x").unwrap_err() {
            Error::NonFinite { tensor, index, .. } => {
                assert_eq!(tensor, "x");
                assert_eq!(index, vec![1, 0]);
            }
            e => panic!("wrong error {e}"),
        }
    }

    #[test]
    fn the_first_non_finite_element_is_found_in_any_chunk() {
        let n = 5000;
        assert_eq!(Tensor::<f32>::ones(&[n]).unwrap().first_non_finite(), None);
        for (bad, also) in [
            (0, 4999),
            (1023, 1024),
            (1024, 3000),
            (2047, 2048),
            (4999, 4999),
        ] {
            let mut v = vec![1.0f32; n];
            v[also] = f32::INFINITY;
            v[bad] = f32::NAN;
            let t = Tensor::from_vec(&[n], v).unwrap();
            let (i, value) = t.first_non_finite().unwrap();
            assert_eq!(i, bad.min(also), "{bad} {also}");
            assert!(if i == bad {
                value.is_nan()
            } else {
                value == f64::INFINITY
            });
        }
        let mut v = vec![0.5f64; 3000];
        v[2999] = f64::NEG_INFINITY;
        let t = Tensor::from_vec(&[3, 1000], v).unwrap();
        assert_eq!(t.first_non_finite(), Some((2999, f64::NEG_INFINITY)));
    }

    /// Past one task's 64 chunks the scan is split over the pool: whatever
    /// the thread count, the first bad element in index order is the one
    /// found (here a later task's chunk holds a NaN too, and may finish
    /// first).
    #[test]
    fn the_first_non_finite_element_wins_over_any_thread_count() {
        let n = 300 * 1024;
        for (bad, also) in [
            (70 * 1024 + 5, 250 * 1024),
            (64 * 1024, 64 * 1024 + 1),
            (n - 1, n - 1),
        ] {
            let mut v = vec![1.0f32; n];
            v[also] = f32::NAN;
            v[bad] = f32::NEG_INFINITY;
            let t = Tensor::from_vec(&[n], v).unwrap();
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| t.first_non_finite());
                assert_eq!(got, Some((bad, f64::NEG_INFINITY)), "{threads} threads");
            }
        }
    }

    #[test]
    fn a_copy_does_not_share_storage() {
        let t = Tensor::<f32>::from_vec(&[2], vec![1.0, 2.0]).unwrap();
        let c = Tensor::<f32>::from_vec(&[2], t.as_slice().to_vec()).unwrap();
        assert!(t.shares_storage(&t.clone()));
        assert!(!t.shares_storage(&c));
    }

    #[test]
    fn debug_shows_dtype_shape_and_values_and_elides_long_data() {
        let t = Tensor::<f32>::from_vec(&[2], vec![1.5, -2.0]).unwrap();
        assert_eq!(format!("{t:?}"), "Tensor<f32>[2] [1.5, -2.0]");
        let data: Vec<f64> = (0..17).map(f64::from).collect();
        let t = Tensor::<f64>::from_vec(&[17], data).unwrap();
        assert_eq!(format!("{t:?}"), "Tensor<f64>[17] [0, 1, ..., 16]");
        let t = Tensor::<f64>::zeros(&[4, 4]).unwrap();
        assert!(format!("{t:?}").ends_with(&format!("{:?}", vec![0.0f64; 16])));
    }

    #[test]
    fn unravel_is_row_major_and_skips_zero_dims() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(7, &[2, 2, 2]), vec![1, 1, 1]);
        // A zero dim takes no part (no division by zero).
        assert_eq!(unravel(1, &[0, 3]), vec![0, 1]);
    }

    #[test]
    fn reshape_shares_storage_and_checks_count() {
        let t = Tensor::<f32>::zeros(&[2, 3]).unwrap();
        let r = t.reshape(&[3, 2]).unwrap();
        assert!(r.shares_storage(&t));
        assert!(t.reshape(&[4, 2]).is_err());
    }

    struct Borrowed(Vec<f64>);
    impl ExternalData<f64> for Borrowed {
        fn as_slice(&self) -> &[f64] {
            &self.0
        }
    }

    #[test]
    fn external_data_is_read_in_place_and_its_length_checked() {
        let data = Arc::new(Borrowed(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let ptr = data.0.as_ptr();
        let t = Tensor::from_external(&[2, 3], data.clone()).unwrap();
        assert_eq!(t.as_slice().as_ptr(), ptr, "no copy was made");
        assert_eq!(t.view()[[1, 0]], 4.0);
        assert!(t.is_on_host());
        let r = t.reshape(&[3, 2]).unwrap();
        assert!(r.shares_storage(&t));
        assert_eq!(r.as_slice().as_ptr(), ptr);
        let e = Tensor::from_external(&[4, 2], data.clone()).unwrap_err();
        assert_eq!(e.kind(), "shape_mismatch");
        assert!(Tensor::from_external(&[5], data).is_err());
    }

    /// Device memory as a backend would hold it: here, a host vector that
    /// counts its downloads.
    struct FakeDevice {
        data: Vec<f32>,
        downloads: std::sync::atomic::AtomicUsize,
    }

    impl DeviceStorage<f32> for FakeDevice {
        fn numel(&self) -> usize {
            self.data.len()
        }
        fn download(&self) -> Result<Vec<f32>> {
            self.downloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self.data.clone())
        }
    }

    #[test]
    fn device_storage_is_downloaded_once_and_uploaded_once() {
        let dev = Box::new(FakeDevice {
            data: vec![1.0, 2.0, 3.0],
            downloads: Default::default(),
        });
        let t = Tensor::from_device(&[3], dev);
        assert!(!t.is_on_host());
        assert_eq!(t.as_slice(), &[1.0, 2.0, 3.0]);
        assert!(t.is_on_host());
        assert_eq!(t.to_vec(), vec![1.0, 2.0, 3.0]);
        // The device copy is the one the tensor was made with, downloaded once.
        let d = t.device_or_upload(|_| panic!("no upload needed")).unwrap();
        let fake = (d as &dyn Any).downcast_ref::<FakeDevice>().unwrap();
        assert_eq!(fake.downloads.load(std::sync::atomic::Ordering::Relaxed), 1);

        // A host tensor is uploaded on first use only.
        let h = Tensor::<f32>::from_vec(&[2], vec![4.0, 5.0]).unwrap();
        let mut uploads = 0;
        for _ in 0..2 {
            let d = h
                .device_or_upload(|host| {
                    uploads += 1;
                    Ok(Box::new(FakeDevice {
                        data: host.to_vec(),
                        downloads: Default::default(),
                    }))
                })
                .unwrap();
            assert_eq!(d.numel(), 2);
        }
        assert_eq!(uploads, 1);
        let e = h.device_or_upload(|_| Err(Error::Device("x".into())));
        assert!(e.is_ok(), "the cached copy is returned without uploading");
    }

    /// Device memory whose copy to the host fails, as after a kernel's
    /// asynchronous fault.
    struct FailingDevice;

    impl DeviceStorage<f32> for FailingDevice {
        fn numel(&self) -> usize {
            1
        }
        fn download(&self) -> Result<Vec<f32>> {
            Err(Error::Device("illegal address (a kernel's fault)".into()))
        }
    }

    #[test]
    fn a_failed_download_is_an_error_where_results_are_first_read() {
        let t = Tensor::<f32>::from_device(&[1], Box::new(FailingDevice));
        for e in [
            t.try_as_slice().map(|_| ()).unwrap_err(),
            t.item().map(|_| ()).unwrap_err(),
            t.check_finite("loss").unwrap_err(),
        ] {
            assert_eq!(e.kind(), "device");
            assert!(e.to_string().contains("illegal address"), "{e}");
        }
        // Nothing was cached: a later read tries the device again.
        assert!(!t.is_on_host());
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.as_slice().len()))
            .unwrap_err();
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("device-to-host copy failed"), "{msg}");
    }

    #[test]
    fn only_the_sole_handle_on_an_engine_buffer_gives_up_its_elements() {
        let t = Tensor::<f32>::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let ptr = t.as_slice().as_ptr();
        // Shared with a clone or a reshape: refused, and nothing changes.
        for other in [t.clone(), t.reshape(&[4]).unwrap()] {
            let back = t.clone().try_into_vec().unwrap_err();
            assert_eq!(back.as_slice().as_ptr(), ptr);
            assert_eq!(other.as_slice(), &[1.0, 2.0, 3.0, 4.0]);
        }
        // The only handle: its own buffer, no copy.
        let v = t.try_into_vec().unwrap();
        assert_eq!((v.as_ptr(), v), (ptr, vec![1.0, 2.0, 3.0, 4.0]));
        // External memory is not the engine's to give away, nor is a
        // tensor with a device copy (the copy would go stale), downloaded
        // or not.
        let e = Tensor::from_external(&[2], Arc::new(Borrowed(vec![5.0, 6.0]))).unwrap();
        let e = e.try_into_vec().unwrap_err();
        assert_eq!(e.as_slice(), &[5.0, 6.0]);
        let device = || {
            Tensor::from_device(
                &[1],
                Box::new(FakeDevice {
                    data: vec![7.0],
                    downloads: Default::default(),
                }),
            )
        };
        let d = device().try_into_vec().unwrap_err();
        assert_eq!(d.as_slice(), &[7.0]);
        let d = d.try_into_vec().unwrap_err();
        assert_eq!(d.as_slice(), &[7.0]);
    }

    #[test]
    fn unravel_row_major() {
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(5, &[2, 3, 4]), vec![0, 1, 1]);
    }
}
