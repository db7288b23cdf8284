//! Reading a whole file with a bound on its size, shared by every reader.

use std::path::Path;

use crate::error::{Error, Result};

/// Default bound on the size of a file dmkd reads (8 GiB); override with the
/// environment variable `DMKD_MAX_FILE_BYTES`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 << 30;

/// The bound on a file's size: `DMKD_MAX_FILE_BYTES` if set, else
/// [`DEFAULT_MAX_FILE_BYTES`]. A value that is not a byte count is an error
/// (ignoring it would silently apply the default).
pub fn max_file_bytes() -> Result<u64> {
    Ok(byte_limit_from_env("DMKD_MAX_FILE_BYTES")?.unwrap_or(DEFAULT_MAX_FILE_BYTES))
}

/// The byte count in the environment variable `var`, if it is set.
pub(crate) fn byte_limit_from_env(var: &'static str) -> Result<Option<u64>> {
    parse_byte_limit(var, std::env::var_os(var))
}

/// `value` of the variable `var` as a byte count: decimal digits, nothing
/// else (no unit suffix).
fn parse_byte_limit(var: &'static str, value: Option<std::ffi::OsString>) -> Result<Option<u64>> {
    let Some(value) = value else {
        return Ok(None);
    };
    value
        .to_str()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::arg(
                var,
                format!(
                    "{value:?} is not a byte count (decimal digits, e.g. 1073741824 for 1 GiB)"
                ),
            )
        })
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
    read_bounded_to(path, max_file_bytes()?)
}

/// [`read_bounded`] under an explicit limit in bytes.
fn read_bounded_to(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let dir = crate::io::scratch_dir("bounded");
        let path = dir.join("ten.bin");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_bounded_to(&path, 10).unwrap(), b"0123456789");
        let bytes_of = |e: Error| match e {
            Error::TooLarge { bytes, limit, .. } => (bytes, limit),
            e => panic!("{e}"),
        };
        // Refused from its size, before reading: the error names the whole size.
        assert_eq!(bytes_of(read_bounded_to(&path, 9).unwrap_err()), (10, 9));
        assert_eq!(bytes_of(read_bounded_to(&path, 3).unwrap_err()), (10, 3));
        // A file whose size reads 0 (procfs) is bounded while it is read.
        let status = Path::new("/proc/self/status");
        if status.metadata().is_ok_and(|m| m.len() == 0) {
            assert_eq!(bytes_of(read_bounded_to(status, 16).unwrap_err()), (17, 16));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_byte_limit_is_decimal_digits_or_an_error() {
        let parse = |v: Option<&str>| parse_byte_limit("DMKD_X", v.map(Into::into));
        assert_eq!(parse(None).unwrap(), None);
        assert_eq!(parse(Some("0")).unwrap(), Some(0));
        assert_eq!(parse(Some("1073741824")).unwrap(), Some(1 << 30));
        for bad in ["4k", "", " 12", "-1", "1e9", "18446744073709551616"] {
            let e = parse(Some(bad)).unwrap_err();
            assert_eq!(e.kind(), "invalid_argument", "{bad}");
            assert!(e.to_string().contains("DMKD_X"), "{e}");
        }
    }
}
