//! Named tensors: the maps every layer above the engine passes around
//! (inputs, parameters, gradients by exchange-format name) and the contents
//! of a tensor file. Files are read and written by the `io` module; the
//! losses take and return [`TensorMap`]s.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::tensor::{DType, Float, Tensor};

/// Tensors by exchange-format name, in a fixed (sorted) order.
pub type TensorMap<T> = BTreeMap<String, Tensor<T>>;

/// A tensor read from a file, in the file's own precision.
#[derive(Clone, Debug)]
pub enum AnyTensor {
    /// An f32 tensor.
    F32(Tensor<f32>),
    /// An f64 tensor.
    F64(Tensor<f64>),
}

impl AnyTensor {
    /// The tensor's precision.
    pub fn dtype(&self) -> DType {
        match self {
            AnyTensor::F32(_) => DType::F32,
            AnyTensor::F64(_) => DType::F64,
        }
    }
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            AnyTensor::F32(t) => t.shape(),
            AnyTensor::F64(t) => t.shape(),
        }
    }
    /// The values converted to `T` (exact when widening).
    pub fn to<T: Float>(&self) -> Tensor<T> {
        match self {
            AnyTensor::F32(t) => t.cast(),
            AnyTensor::F64(t) => t.cast(),
        }
    }
    /// [`AnyTensor::to`], refusing a finite value that `T` cannot hold
    /// (an f64 tensor read as f32: 1e300 would become infinity, and the
    /// error would later blame the file for holding one). `name` names the
    /// tensor in the error.
    pub fn try_to<T: Float>(&self, name: &str) -> Result<Tensor<T>> {
        let t = self.to::<T>();
        if let AnyTensor::F64(src) = self
            && let Some((i, _)) = t.first_non_finite()
            && src.as_slice()[i].is_finite()
        {
            return Err(Error::arg(
                "precision conversion",
                format!(
                    "{name}: {:e} at index {:?} is beyond {}'s range; compute in f64",
                    src.as_slice()[i],
                    crate::tensor::unravel(i, src.shape()),
                    T::DTYPE
                ),
            ));
        }
        Ok(t)
    }
    /// The values as f64 (exact for both precisions).
    pub fn to_f64(&self) -> Tensor<f64> {
        self.to()
    }
}

/// The contents of a tensor file: tensors by name, plus string metadata.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// The tensors, by name.
    pub tensors: BTreeMap<String, AnyTensor>,
    /// String metadata (`config`, `dtype`, ... in the exchange format).
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// The single precision of every tensor, or None when the file is empty.
    /// Mixed precisions are an error naming `path`: a file from one backend
    /// has one dtype.
    pub fn dtype(&self, path: &str) -> Result<Option<DType>> {
        let mut it = self.tensors.iter();
        let Some((_, first)) = it.next() else {
            return Ok(None);
        };
        for (name, t) in it {
            if t.dtype() != first.dtype() {
                return Err(Error::DType {
                    name: format!("{path}: {name}"),
                    expected: first.dtype().to_string(),
                    got: t.dtype().to_string(),
                });
            }
        }
        Ok(Some(first.dtype()))
    }

    /// The `sample_offset` metadata (a data-parallel shard's first sample
    /// in the whole batch, as `dmkd eval` and `dmkd golden` write it), or
    /// None when the file has none; text that is not a decimal integer a
    /// `usize` holds is a format error naming `path`.
    pub fn sample_offset(&self, path: &str) -> Result<Option<usize>> {
        let Some(text) = self.metadata.get("sample_offset") else {
            return Ok(None);
        };
        text.parse::<usize>().map(Some).map_err(|_| Error::Format {
            path: path.to_string(),
            detail: format!(
                "`sample_offset` metadata {text:?} is not an integer in [0, {}]",
                usize::MAX
            ),
        })
    }

    /// Every tensor converted to `T` by [`AnyTensor::try_to`]: an error
    /// names the first finite value `T` cannot hold.
    pub fn to_map<T: Float>(&self) -> Result<TensorMap<T>> {
        self.tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.try_to::<T>(k)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dtype_per_file() {
        let mut f = TensorFile::default();
        assert_eq!(f.dtype("f").unwrap(), None);
        f.tensors
            .insert("a".into(), AnyTensor::F32(Tensor::scalar(1.5)));
        assert_eq!(f.dtype("f").unwrap(), Some(DType::F32));
        f.tensors
            .insert("b".into(), AnyTensor::F64(Tensor::scalar(2.0)));
        let e = f.dtype("f").unwrap_err();
        assert_eq!(e.kind(), "dtype");
        assert!(e.to_string().contains("f: b"), "{e}");
        let m = f.to_map::<f64>().unwrap();
        assert_eq!((m["a"].item().unwrap(), m["b"].item().unwrap()), (1.5, 2.0));
        assert_eq!(f.tensors["a"].shape(), &[] as &[usize]);
        let t = AnyTensor::F32(Tensor::from_vec(&[2, 1], vec![0.25, -3.0]).unwrap());
        assert_eq!(t.shape(), &[2, 1]);
        assert_eq!(t.to_f64().as_slice(), &[0.25, -3.0]);
        assert_eq!(t.to::<f32>().as_slice(), &[0.25, -3.0]);
    }

    #[test]
    fn sample_offset_metadata_is_read_or_refused_naming_the_file() {
        let mut f = TensorFile::default();
        assert_eq!(f.sample_offset("f").unwrap(), None);
        for (text, want) in [("0", 0), ("4294967293", 4294967293), ("+7", 7)] {
            f.metadata.insert("sample_offset".into(), text.into());
            assert_eq!(f.sample_offset("f").unwrap(), Some(want), "{text}");
        }
        let past = format!("{}0", usize::MAX);
        for text in ["-1", "x", "1e3", "", " 3", past.as_str()] {
            f.metadata.insert("sample_offset".into(), text.into());
            let e = f.sample_offset("in.safetensors").unwrap_err();
            assert_eq!(e.kind(), "format", "{text}");
            let says =
                format!("in.safetensors: `sample_offset` metadata {text:?} is not an integer");
            assert!(e.to_string().contains(&says), "{e}");
        }
    }

    #[test]
    fn narrowing_refuses_values_beyond_f32_and_reports_the_file_s_own_infinities_later() {
        let big = AnyTensor::F64(Tensor::from_vec(&[2, 2], vec![1.0, -2.0, -1e300, 4e38]).unwrap());
        let e = big.try_to::<f32>("x").unwrap_err();
        assert_eq!(e.kind(), "invalid_argument");
        assert!(
            e.to_string()
                .contains("x: -1e300 at index [1, 0] is beyond f32's range"),
            "{e}"
        );
        assert_eq!(big.try_to::<f64>("x").unwrap().as_slice()[2], -1e300);
        // The largest f32 passes; a subnormal rounds (to zero), as any
        // narrowing rounds.
        let fits = AnyTensor::F64(Tensor::from_vec(&[2], vec![f32::MAX as f64, 1e-320]).unwrap());
        assert_eq!(
            fits.try_to::<f32>("x").unwrap().as_slice(),
            &[f32::MAX, 0.0]
        );
        // A value that is already infinite is the file's own: left for the
        // finiteness check, which names it as such.
        let inf = AnyTensor::F64(Tensor::from_vec(&[2], vec![f64::INFINITY, 1e300]).unwrap());
        assert!(inf.try_to::<f32>("x").unwrap().as_slice()[0].is_infinite());
        let mut f = TensorFile::default();
        f.tensors.insert("x".into(), big);
        assert!(f.to_map::<f32>().is_err());
        assert!(f.to_map::<f64>().is_ok());
    }
}
