//! `.safetensors` files: f32 or f64 tensors under their exchange-format
//! names, plus string metadata.
//!
//! The header is validated by the `safetensors` crate (offsets must tile the
//! data exactly, so a header cannot claim more bytes than the file has), and
//! every tensor must be f32 or f64.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

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
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
    // The crate reads the header into maps, where a repeated name keeps its
    // last entry only: refuse instead of reading one of two tensors.
    if let Some(key) = super::json_keys::repeated_key(&bytes[8..8 + header_len]) {
        return Err(fmt(format!("`{key}` appears twice in the header")));
    }
    let mut out = TensorFile {
        tensors: BTreeMap::new(),
        metadata: meta.metadata().clone().unwrap_or_default(),
    };
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        // Bytes in the error at the file's element size (a byte for the
        // sub-byte dtypes, which are refused below anyway).
        crate::tensor::checked_numel_sized(&shape, view.dtype().bitsize().div_ceil(8))?;
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

fn dtype_tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
    }
}

/// The header of a `.safetensors` file: a JSON object with `__metadata__`
/// first (keys sorted) and then every tensor in name order, whose data lie
/// back to back in that order; padded with spaces to a multiple of 8 bytes
/// (the alignment the format's own writer keeps).
///
/// Written here rather than by `safetensors::serialize` because that keeps
/// the metadata in a `HashMap`, whose order changes from run to run: the same
/// tensors gave files with different bytes. Here equal inputs give equal
/// bytes, so a golden file has one checksum. The `safetensors` crate still
/// parses and validates every file dmkd reads, these included (tests below).
fn safetensors_header<T: Float>(
    tensors: &TensorMap<T>,
    metadata: &HashMap<String, String>,
) -> Vec<u8> {
    use serde_json::Value;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        let meta = sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let len = t.numel() * T::DTYPE.size_of();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_tag(T::DTYPE),
                "shape": t.shape(),
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    // A JSON value of strings and integers always serializes.
    let mut bytes = Value::Object(header).to_string().into_bytes();
    bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
    bytes
}

/// Write tensors (and string metadata) to a `.safetensors` file, byte for
/// byte the same for the same tensors and metadata, whole or not at all
/// (`write_atomically`: a failed write leaves the file that was there).
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
    let header = safetensors_header(tensors, metadata);
    super::write_atomically(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for t in tensors.values() {
            out.write_all(&T::to_le_bytes_vec(t.as_slice()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bits_names_and_metadata() {
        let dir = crate::io::scratch_dir("io");
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
        let b = back.to_map::<f64>().unwrap();
        assert_eq!(b["a"].shape(), &[2, 2]);
        assert_eq!(b["loss"].shape(), &[] as &[usize]);
        for (x, y) in b["a"].as_slice().iter().zip(m["a"].as_slice()) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn equal_inputs_give_byte_identical_files_the_crate_reads() {
        let dir = crate::io::scratch_dir("io3");
        let mut m = TensorMap::<f32>::new();
        for (i, name) in ["p1.x", "grad.a", "loss", "z", "a.b.c"].iter().enumerate() {
            let shape: Vec<usize> = vec![i + 1; i % 3];
            let t = Tensor::from_fn(&shape, |k| (k + i) as f32 * 0.5).unwrap();
            m.insert(name.to_string(), t);
        }
        // Many metadata keys: a HashMap iterates them in a per-process
        // random order, so each write builds a fresh map.
        let meta = || -> HashMap<String, String> {
            (0..24)
                .map(|k| (format!("key{k}"), format!("value {k}")))
                .collect()
        };
        let mut files = Vec::new();
        for r in 0..4 {
            let path = dir.join(format!("r{r}.safetensors"));
            write_safetensors(&path, &m, &meta()).unwrap();
            files.push(std::fs::read(&path).unwrap());
        }
        assert!(files.iter().all(|f| f == &files[0]));
        let bytes = &files[0];
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0, "header padded to 8 bytes");
        // The safetensors crate reads it back: names, shapes, bits, metadata.
        let back = parse_safetensors(bytes, "r0").unwrap();
        assert_eq!(back.metadata, meta());
        let b = back.to_map::<f32>().unwrap();
        assert_eq!(b.len(), m.len());
        for (name, t) in &m {
            assert_eq!(b[name].shape(), t.shape(), "{name}");
            assert_eq!(b[name].as_slice(), t.as_slice(), "{name}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    /// A safetensors file by hand: the header text, padded, then `data`.
    fn by_hand(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_name_twice_in_the_header_is_refused_not_replaced() {
        let one = 1.0f32.to_le_bytes();
        let entry =
            |name: &str| format!(r#""{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
        let good = by_hand(&format!("{{{}}}", entry("a")), &one);
        assert_eq!(parse_safetensors(&good, "f").unwrap().tensors.len(), 1);
        // The crate alone accepts both (its map keeps one `a`).
        let twice = by_hand(&format!("{{{},{}}}", entry("a"), entry("a")), &one);
        let e = parse_safetensors(&twice, "f").unwrap_err();
        assert_eq!(e.kind(), "format");
        assert!(e.to_string().contains("`a` appears twice"), "{e}");
        let meta = |m: &str| {
            by_hand(
                &format!(r#"{{"__metadata__":{{{m}}},{}}}"#, entry("a")),
                &one,
            )
        };
        let f = parse_safetensors(&meta(r#""config":"x","dtype":"f32""#), "f").unwrap();
        assert_eq!(f.metadata["config"], "x");
        let e = parse_safetensors(&meta(r#""config":"x","config":"y""#), "f").unwrap_err();
        assert!(
            e.to_string()
                .contains("`__metadata__.config` appears twice"),
            "{e}"
        );
        // The first repeat is named, whichever object it is in.
        let both = by_hand(
            &format!(
                r#"{{"__metadata__":{{"k":"1","k":"2"}},{},{}}}"#,
                entry("a"),
                entry("a")
            ),
            &one,
        );
        let e = parse_safetensors(&both, "f").unwrap_err();
        assert!(
            e.to_string().contains("`__metadata__.k` appears twice"),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_garbage_files_are_format_errors() {
        let mut m = TensorMap::<f32>::new();
        m.insert(
            "x".into(),
            Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap(),
        );
        let dir = crate::io::scratch_dir("io2");
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
