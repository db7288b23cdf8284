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
