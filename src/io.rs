//! Files in and out: `.safetensors` (f32 or f64, little-endian, row-major,
//! NCHW), with the exchange-format names of `docs/spec.md`.
//!
//! Reading is defensive: the file's size is checked before it is read, the
//! header is validated by the `safetensors` crate (offsets must tile the
//! data exactly, so a header cannot claim more bytes than the file has), and
//! every tensor must be f32 or f64. Nothing is allocated from a size the
//! file merely claims.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::distill::TensorMap;
use crate::error::{Error, Result};
use crate::tensor::{DType, Float, Tensor};

/// Default bound on the size of a file dmkd reads (8 GiB); override with the
/// environment variable `DMKD_MAX_FILE_BYTES`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 30;

pub fn max_file_bytes() -> u64 {
    std::env::var("DMKD_MAX_FILE_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_MAX_FILE_BYTES)
}

/// A tensor read from a file, in the file's own precision.
#[derive(Clone, Debug)]
pub enum AnyTensor {
    F32(Tensor<f32>),
    F64(Tensor<f64>),
}

impl AnyTensor {
    pub fn dtype(&self) -> DType {
        match self {
            AnyTensor::F32(_) => DType::F32,
            AnyTensor::F64(_) => DType::F64,
        }
    }
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
    /// The values as f64 (exact for both precisions).
    pub fn to_f64(&self) -> Tensor<f64> {
        self.to()
    }
}

/// The contents of a tensor file: tensors by name, plus string metadata.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, AnyTensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// The single precision of every tensor, or None when the file is empty.
    /// Mixed precisions are an error: a file from one backend has one dtype.
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

    /// Every tensor converted to `T`.
    pub fn to_map<T: Float>(&self) -> TensorMap<T> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to::<T>()))
            .collect()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Read a whole file after checking its size against the bound.
///
/// The size in the metadata is checked first (a cheap refusal), and the read
/// itself stops one byte past the bound: a device or pipe (`/dev/zero`, a
/// FIFO) reports size 0 and would otherwise be read forever.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let limit = max_file_bytes();
    let too_large = |bytes: u64| Error::TooLarge {
        what: format!("file {}", path.display()),
        bytes: bytes as u128,
        limit: limit as u128,
    };
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    if meta.is_dir() {
        return Err(io_err(
            path,
            std::io::Error::other("is a directory, not a file"),
        ));
    }
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Parse safetensors bytes.
pub fn parse_safetensors(bytes: &[u8], path: &str) -> Result<TensorFile> {
    let fmt = |detail: String| Error::Format {
        path: path.to_string(),
        detail,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| fmt(format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
    let mut out = TensorFile {
        tensors: BTreeMap::new(),
        metadata: meta.metadata().clone().unwrap_or_default(),
    };
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        crate::tensor::checked_numel(&shape)?;
        let t = match view.dtype() {
            Dtype::F32 => AnyTensor::F32(Tensor::from_vec(
                &shape,
                f32::from_le_bytes_vec(view.data()),
            )?),
            Dtype::F64 => AnyTensor::F64(Tensor::from_vec(
                &shape,
                f64::from_le_bytes_vec(view.data()),
            )?),
            other => {
                return Err(Error::DType {
                    name: format!("{path}: {name}"),
                    expected: "f32 or f64".into(),
                    got: format!("{other:?}").to_lowercase(),
                });
            }
        };
        out.tensors.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Read a `.safetensors` file.
pub fn read_safetensors(path: &Path) -> Result<TensorFile> {
    let bytes = read_bounded(path)?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// Read a tensor file: a directory of `.npy` files, a `.npy` or `.npz` (by
/// extension; see `npy`), or else a `.safetensors` file.
pub fn read_tensor_file(path: &Path) -> Result<TensorFile> {
    if path.is_dir() {
        return crate::npy::read_npy_dir(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") | Some("npz") => crate::npy::read_npy_or_npz(path),
        _ => read_safetensors(path),
    }
}

struct TensorBytes<'a, T: Float> {
    t: &'a Tensor<T>,
}

impl<T: Float> View for TensorBytes<'_, T> {
    fn dtype(&self) -> Dtype {
        match T::DTYPE {
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
        }
    }
    fn shape(&self) -> &[usize] {
        self.t.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(T::to_le_bytes_vec(self.t.as_slice()))
    }
    fn data_len(&self) -> usize {
        self.t.numel() * T::DTYPE.size_of()
    }
}

/// Write tensors (and string metadata) to a `.safetensors` file.
pub fn write_safetensors<T: Float>(
    path: &Path,
    tensors: &TensorMap<T>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let views = tensors.iter().map(|(k, t)| (k.as_str(), TensorBytes { t }));
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::tensor::serialize_to_file(views, meta, path).map_err(|e| Error::Format {
        path: path.display().to_string(),
        detail: format!("cannot write: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bits_names_and_metadata() {
        let dir = std::env::temp_dir().join(format!("dmkd-io-{}", std::process::id()));
        let path = dir.join("rt.safetensors");
        let mut m = TensorMap::<f64>::new();
        m.insert(
            "a".into(),
            Tensor::from_vec(&[2, 2], vec![1.0, -0.0, f64::MIN_POSITIVE, 3.5]).unwrap(),
        );
        m.insert("loss".into(), Tensor::scalar(0.25));
        let meta = HashMap::from([("config".to_string(), "{}".to_string())]);
        write_safetensors(&path, &m, &meta).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back.metadata["config"], "{}");
        assert_eq!(back.dtype("x").unwrap(), Some(DType::F64));
        let b = back.to_map::<f64>();
        assert_eq!(b["a"].shape(), &[2, 2]);
        assert_eq!(b["loss"].shape(), &[] as &[usize]);
        for (x, y) in b["a"].as_slice().iter().zip(m["a"].as_slice()) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn truncated_and_garbage_files_are_format_errors() {
        let mut m = TensorMap::<f32>::new();
        m.insert(
            "x".into(),
            Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap(),
        );
        let dir = std::env::temp_dir().join(format!("dmkd-io2-{}", std::process::id()));
        let path = dir.join("t.safetensors");
        write_safetensors(&path, &m, &HashMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            let e = parse_safetensors(&bytes[..cut], "t").unwrap_err();
            assert_eq!(e.kind(), "format", "cut at {cut}");
        }
        // A header that claims a huge tensor the file does not hold.
        let header =
            br#"{"x":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}"#;
        let mut lying = (header.len() as u64).to_le_bytes().to_vec();
        lying.extend_from_slice(header);
        lying.extend_from_slice(&[0u8; 12]);
        assert_eq!(parse_safetensors(&lying, "t").unwrap_err().kind(), "format");
        std::fs::remove_dir_all(dir).ok();
    }
}
