//! Files in and out, in the exchange format of `docs/spec.md`: `.safetensors`
//! (f32 or f64, little-endian, row-major, NCHW), `.npy` / `.npz` archives and
//! directories of `.npy` files.
//!
//! Reading is defensive: the file's size is checked before it is read
//! ([`read_bounded`]), and nothing is allocated from a size the file merely
//! claims. Every malformed file is a typed [`Error`](crate::Error).

pub(crate) mod bounded;
pub(crate) mod json_keys;
pub mod npy;
mod safetensors;

use std::path::Path;

pub use self::bounded::{DEFAULT_MAX_FILE_BYTES, max_file_bytes, read_bounded};
pub use self::safetensors::{parse_safetensors, read_safetensors, write_safetensors};
use crate::error::Result;
pub use crate::named::{AnyTensor, TensorFile, TensorMap};

/// Read a tensor file: a directory of `.npy` files, a `.npy` or `.npz` (by
/// extension; see [`npy`]), or else a `.safetensors` file.
pub fn read_tensor_file(path: &Path) -> Result<TensorFile> {
    if path.is_dir() {
        return npy::read_npy_dir(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") | Some("npz") => npy::read_npy_or_npz(path),
        _ => read_safetensors(path),
    }
}

/// A fresh, empty directory for one test's files, per process and `tag`
/// (what an earlier, aborted run left there is removed first).
#[cfg(test)]
pub(crate) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dmkd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    /// The extension picks the reader: `.npy` and `.npz` by NumPy's format
    /// (a `.npy` read as safetensors would be a format error), anything
    /// else as safetensors, a directory as `.npy` files.
    #[test]
    fn the_reader_follows_the_extension() {
        let dir = scratch_dir("io-ext");
        let t = Tensor::<f32>::from_vec(&[2], vec![1.5, -2.0]).unwrap();
        let npy = dir.join("x.npy");
        std::fs::write(&npy, npy::npy_bytes(&t).unwrap()).unwrap();
        let f = read_tensor_file(&npy).unwrap();
        assert_eq!(f.tensors["x"].shape(), &[2]);
        let m = TensorMap::from([("y".to_string(), t.clone())]);
        let st = dir.join("y.bin");
        write_safetensors(&st, &m, &Default::default()).unwrap();
        assert_eq!(read_tensor_file(&st).unwrap().tensors["y"].shape(), &[2]);
        // The same safetensors bytes under a .npy name: read as NumPy's, refused.
        let lying = dir.join("z.npy");
        std::fs::copy(&st, &lying).unwrap();
        assert_eq!(read_tensor_file(&lying).unwrap_err().kind(), "format");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
