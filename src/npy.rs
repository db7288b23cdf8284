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

/// Write every tensor as `<dir>/<name>.npy` and the metadata as `<dir>/metadata.json`.
pub fn write_npy_dir<T: crate::tensor::Float>(
    dir: &Path,
    tensors: &crate::distill::TensorMap<T>,
    metadata: &std::collections::HashMap<String, String>,
) -> Result<()> {
    Err(Error::Format {
        path: dir.display().to_string(),
        detail: format!(
            "npy output is not supported yet ({} tensors, {} metadata keys)",
            tensors.len(),
            metadata.len()
        ),
    })
}
