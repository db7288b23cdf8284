//! `.npy` / `.npz` input (work in progress).

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::TensorFile;

/// Read a `.npy` file (one tensor, named after the file stem) or an `.npz`
/// archive (one tensor per member).
pub fn read_npy_or_npz(path: &Path) -> Result<TensorFile> {
    Err(Error::Format {
        path: path.display().to_string(),
        detail: "npy/npz input is not supported yet".into(),
    })
}
