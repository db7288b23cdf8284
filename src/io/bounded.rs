//! Reading a whole file with a bound on its size, shared by every reader.

use std::path::Path;

use crate::error::{Error, Result};

/// Default bound on the size of a file dmkd reads (8 GiB); override with the
/// environment variable `DMKD_MAX_FILE_BYTES`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 30;

/// The bound on a file's size: `DMKD_MAX_FILE_BYTES` if set, else
/// [`DEFAULT_MAX_FILE_BYTES`].
pub fn max_file_bytes() -> u64 {
    std::env::var("DMKD_MAX_FILE_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_MAX_FILE_BYTES)
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Read a whole file after checking its size against [`max_file_bytes`].
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
