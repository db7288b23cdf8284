//! `.safetensors` files: f32 or f64 tensors under their exchange-format
//! names, plus string metadata.
//!
//! The header is validated by the `safetensors` crate (offsets must tile the
//! data exactly, so a header cannot claim more bytes than the file has), and
//! every tensor must be f32 or f64.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::bounded::{io_err, read_bounded};
use crate::error::{Error, Result};
use crate::named::{AnyTensor, TensorFile, TensorMap};
use crate::tensor::{DType, Float, Tensor};

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
