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

/// Write the file `path` whole or not at all.
///
/// `fill` writes into a temporary file beside `path` (in the same directory,
/// so the rename stays on one file system), which replaces `path` only once
/// every byte is written and flushed. So a write that fails half-way (a full
/// disk, a process killed while writing) leaves whatever `path` held before,
/// never a truncated file under its name, and `--out` may name the input file
/// (it is read in full first). On an error the temporary file is removed; a
/// process killed while writing leaves it behind, hidden, as
/// `.<name>.tmp-<pid>-<n>`, which no reader takes for a tensor file. Nothing
/// is synced to the disk: this guards against the process failing, not the
/// machine. Errors name `path`. A `path` that is a symbolic link is replaced
/// by the new file, not written through.
pub(crate) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Two threads of one process (Python releases the GIL) may write the same
    // path at once: each takes its own temporary name.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        bounded::io_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        )
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::File::create(&tmp).and_then(|file| {
        let mut out = std::io::BufWriter::new(file);
        fill(&mut out)?;
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, path)
    });
    written.map_err(|e| {
        // Best effort: the error to report is the write's, not the clean-up's.
        let _ = std::fs::remove_file(&tmp);
        bounded::io_err(path, e)
    })
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

    /// The names a directory holds, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A write that fails half-way leaves the earlier file's bytes under its
    /// name, and no temporary file stays behind, after a failure or a success.
    #[test]
    fn a_failed_write_leaves_the_earlier_file() {
        let dir = scratch_dir("io-atomic");
        let path = dir.join("out.safetensors");
        write_atomically(&path, |w| w.write_all(b"first")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(listing(&dir), ["out.safetensors"]);
        // 1 MiB written (past the write buffer, so bytes reached the disk),
        // then the error a full disk gives.
        let e = write_atomically(&path, |w| {
            w.write_all(&vec![7u8; 1 << 20])?;
            Err(std::io::Error::other("no space left"))
        })
        .unwrap_err();
        assert_eq!(e.kind(), "io");
        let msg = e.to_string();
        assert!(
            msg.contains("out.safetensors") && msg.ends_with("no space left"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(listing(&dir), ["out.safetensors"]);
        write_atomically(&path, |w| w.write_all(b"second")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(listing(&dir), ["out.safetensors"]);
        // A directory that does not exist: an error naming the file.
        let missing = dir.join("absent").join("x.npy");
        let e = write_atomically(&missing, |w| w.write_all(b"x")).unwrap_err();
        assert_eq!(e.kind(), "io");
        assert!(e.to_string().contains("absent/x.npy"), "{e}");
        assert_eq!(listing(&dir), ["out.safetensors"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Threads writing one path at once (Python releases the GIL) each write
    /// a temporary file of their own: the file ends as one write's bytes,
    /// whole, and every write succeeds.
    #[test]
    fn concurrent_writes_of_one_path_each_land_whole() {
        let dir = scratch_dir("io-atomic-threads");
        let path = dir.join("g.safetensors");
        let content = |k: u8| vec![k; 300_000 + usize::from(k)];
        std::thread::scope(|s| {
            for k in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..8 {
                        write_atomically(path, |w| w.write_all(&content(k))).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!((0..4).any(|k| got == content(k)), "a mixed file");
        assert_eq!(listing(&dir), ["g.safetensors"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
