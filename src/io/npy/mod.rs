//! `.npy` / `.npz` files and directories of `.npy` files.
//!
//! - A `.npy` file holds one tensor, named after the file stem
//!   (`p0.student.npy` -> `p0.student`).
//! - An `.npz` archive (what `numpy.savez` / `savez_compressed` write) holds
//!   one `.npy` member per tensor, named after the member without `.npy`; a
//!   `metadata.json` member, if present, is the string metadata.
//! - A directory holds one `<name>.npy` per tensor plus an optional
//!   `metadata.json` (what [`write_npy_dir`] and `dmkd golden --format npy`
//!   write).
//!
//! Only little-endian C-order f32 (`<f4`) and f64 (`<f8`) are accepted;
//! big-endian or other element types are [`Error::DType`], Fortran order of
//! a rank >= 2 array is [`Error::Format`].
//!
//! Why a reader of our own rather than `ndarray-npy`'s: nothing may be
//! allocated from a size a file merely claims. `ndarray-npy` 0.10 allocates
//! the header from its claimed length (up to 4 GiB in format 2.0) and the
//! data from the claimed shape before reading either. Here the header length
//! is bounded by [`MAX_HEADER_BYTES`], the shape's element count is checked
//! against [`MAX_ELEMENTS`](crate::tensor::MAX_ELEMENTS) with overflow-free
//! arithmetic, and its byte count against the bytes actually present (a
//! `.npy`) or the remaining decompression budget (an `.npz` member, whose
//! size only the inflater knows), before any data is read. Writing has no
//! such hazard and uses `ndarray-npy` ([`npy_bytes`]).

mod header;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use ndarray_npy::WriteNpyExt;

use self::header::format_err;
pub use self::header::{MAX_HEADER_BYTES, MAX_RANK, NpyHeader, parse_header_dict};
use super::bounded::{max_file_bytes, read_bounded};
use crate::error::{Error, Result};
use crate::named::{AnyTensor, TensorFile, TensorMap};
use crate::tensor::{DType, Float, Tensor, checked_numel_sized};

/// The first six bytes of every `.npy` file.
pub const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";
/// The first four bytes of a zip archive (a local file header).
pub const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
/// Most members read from one `.npz` (a model's features and parameters are
/// a few hundred tensors); bounds the work a crafted central directory causes.
pub const MAX_NPZ_MEMBERS: usize = 1 << 16;

/// Most bytes of an `.npz` archive's `metadata.json` read: it holds the
/// level config (at most 1 MiB of JSON, `distill::config::MAX_CONFIG_BYTES`)
/// as an escaped string next to a few short ones.
pub const MAX_METADATA_BYTES: usize = 4 << 20;

/// Read `buf.len()` bytes or report truncation.
fn read_exact_or(r: &mut impl Read, buf: &mut [u8], path: &str, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format_err(path, format!("truncated {what}")),
        _ => format_err(path, format!("cannot read {what}: {e}")),
    })
}

/// What bounds the data bytes of a `.npy` stream.
#[derive(Clone, Copy, Debug)]
pub enum DataBound {
    /// The file's size: data beyond what follows the header is a lying header.
    Present(u64),
    /// What is left of a decompression budget: more is too large.
    Budget(u64),
}

/// Read one `.npy` stream: magic, version, header, then exactly the data
/// the header describes and nothing more. A header claiming more data than
/// `bound` allows is refused before any data is read or allocated. Returns
/// the tensor and the number of data bytes read.
pub fn read_npy_stream(
    r: &mut impl Read,
    path: &str,
    bound: DataBound,
) -> Result<(AnyTensor, u64)> {
    let mut pre = [0u8; 8];
    read_exact_or(r, &mut pre, path, ".npy preamble")?;
    if &pre[..6] != NPY_MAGIC {
        return Err(format_err(path, "not a .npy file (bad magic)"));
    }
    let (major, minor) = (pre[6], pre[7]);
    let len_field = if major == 1 { 2 } else { 4 };
    let header_len = match major {
        1 => {
            let mut b = [0u8; 2];
            read_exact_or(r, &mut b, path, ".npy header length")?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            read_exact_or(r, &mut b, path, ".npy header length")?;
            // Compared in u64 so a 32-bit usize cannot wrap.
            let n = u32::from_le_bytes(b);
            if u64::from(n) > MAX_HEADER_BYTES as u64 {
                return Err(format_err(
                    path,
                    format!(".npy header of {n} bytes, over the limit of {MAX_HEADER_BYTES}"),
                ));
            }
            n as usize
        }
        _ => {
            return Err(format_err(
                path,
                format!("unsupported .npy version {major}.{minor}"),
            ));
        }
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(format_err(
            path,
            format!(".npy header of {header_len} bytes, over the limit of {MAX_HEADER_BYTES}"),
        ));
    }
    let mut header = vec![0u8; header_len];
    read_exact_or(r, &mut header, path, ".npy header")?;
    let h = parse_header_dict(&header, path)?;
    let numel = checked_numel_sized(&h.shape, h.dtype.size_of())?;
    // numel <= MAX_ELEMENTS (2^34) and the item size is 8 at most: no overflow in u64.
    let data_bytes = numel as u64 * h.dtype.size_of() as u64;
    match bound {
        DataBound::Present(n)
            if data_bytes > n.saturating_sub((8 + len_field + header_len) as u64) =>
        {
            return Err(format_err(
                path,
                format!(
                    "header claims {data_bytes} bytes of data (shape {:?}, {}), the file holds {} after its header",
                    h.shape,
                    h.dtype,
                    n.saturating_sub((8 + len_field + header_len) as u64)
                ),
            ));
        }
        DataBound::Budget(n) if data_bytes > n => {
            return Err(Error::TooLarge {
                what: format!("{path} (shape {:?}, {})", h.shape, h.dtype),
                bytes: data_bytes as u128,
                limit: n as u128,
            });
        }
        _ => {}
    }
    let mut data = Vec::new();
    // `take` bounds what is read by what the header claims; the vector only
    // grows as bytes actually arrive.
    r.take(data_bytes)
        .read_to_end(&mut data)
        .map_err(|e| format_err(path, format!("cannot read .npy data: {e}")))?;
    if data.len() as u64 != data_bytes {
        return Err(format_err(
            path,
            format!(
                "truncated .npy data: {} of {data_bytes} bytes for shape {:?}",
                data.len(),
                h.shape
            ),
        ));
    }
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(format_err(
                path,
                format!(
                    "trailing bytes after the {data_bytes} data bytes of shape {:?}",
                    h.shape
                ),
            ));
        }
        Err(e) => return Err(format_err(path, format!("cannot read .npy data: {e}"))),
    }
    let t = match h.dtype {
        DType::F32 => AnyTensor::F32(Tensor::from_vec(&h.shape, f32::from_le_bytes_vec(&data))?),
        DType::F64 => AnyTensor::F64(Tensor::from_vec(&h.shape, f64::from_le_bytes_vec(&data))?),
    };
    Ok((t, data_bytes))
}

/// Parse the bytes of one `.npy` file.
pub fn parse_npy(bytes: &[u8], path: &str) -> Result<AnyTensor> {
    let mut r = Cursor::new(bytes);
    // The data must fit what follows the header (trailing bytes are an error too).
    read_npy_stream(&mut r, path, DataBound::Present(bytes.len() as u64)).map(|(t, _)| t)
}

fn parse_metadata(bytes: &[u8], path: &str) -> Result<HashMap<String, String>> {
    // A map keeps the last of a repeated key (a second `config`): refuse.
    if let Some(key) = crate::io::json_keys::repeated_key(bytes) {
        return Err(format_err(
            path,
            format!("metadata.json has the key `{key}` twice"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        format_err(
            path,
            format!("metadata.json must be a JSON object of strings: {e}"),
        )
    })
}

fn insert_unique(out: &mut TensorFile, name: String, t: AnyTensor, path: &str) -> Result<()> {
    if name.is_empty() {
        return Err(format_err(path, "a tensor has an empty name"));
    }
    if out.tensors.insert(name.clone(), t).is_some() {
        return Err(format_err(path, format!("tensor `{name}` appears twice")));
    }
    Ok(())
}

/// The first member name the archive's central directory lists twice, if
/// any. The zip crate keeps the members in a map by name, so a second
/// `loss.npy` would silently replace the first; the directory still has
/// both. `dir_start` is where the directory begins (the zip crate has read
/// it already, so its entries are well formed; the walk checks bounds anyway).
fn repeated_member(bytes: &[u8], dir_start: u64) -> Option<String> {
    const ENTRY: usize = 46; // fixed part of a central directory header
    let mut seen = std::collections::HashSet::new();
    let mut at = usize::try_from(dir_start).ok()?;
    while let Some(h) = bytes.get(at..at.checked_add(ENTRY)?) {
        if h[..4] != *b"PK\x01\x02" {
            break;
        }
        let field = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]) as usize;
        let (name_len, extra_len, comment_len) = (field(28), field(30), field(32));
        let name = bytes.get(at + ENTRY..at + ENTRY + name_len)?;
        if !seen.insert(name) {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        at += ENTRY + name_len + extra_len + comment_len;
    }
    None
}

/// Parse the bytes of an `.npz` archive. `max_total` bounds the sum of the
/// members' decompressed sizes (a deflated member can expand about 1000-fold,
/// so the archive's own size bounds nothing).
pub fn parse_npz(bytes: &[u8], path: &str, max_total: u64) -> Result<TensorFile> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format_err(path, format!("not a valid .npz (zip) archive: {e}")))?;
    if zip.len() > MAX_NPZ_MEMBERS {
        return Err(format_err(
            path,
            format!("{} members, over the limit of {MAX_NPZ_MEMBERS}", zip.len()),
        ));
    }
    if let Some(name) = repeated_member(bytes, zip.central_directory_start()) {
        return Err(format_err(path, format!("member `{name}` appears twice")));
    }
    let mut out = TensorFile::default();
    let mut budget = max_total;
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| format_err(path, format!("member {i}: {e}")))?;
        if member.is_dir() {
            continue;
        }
        let member_name = member.name().to_string();
        let where_ = format!("{path}[{member_name}]");
        if member_name == "metadata.json" {
            let mut text = Vec::new();
            // Configs are small; cap what a crafted member can make us inflate.
            (&mut member)
                .take(MAX_METADATA_BYTES as u64 + 1)
                .read_to_end(&mut text)
                .map_err(|e| format_err(&where_, e.to_string()))?;
            if text.len() > MAX_METADATA_BYTES {
                return Err(Error::TooLarge {
                    what: format!("{where_} (the npz metadata)"),
                    bytes: member.size() as u128,
                    limit: MAX_METADATA_BYTES as u128,
                });
            }
            out.metadata = parse_metadata(&text, &where_)?;
            continue;
        }
        let Some(name) = member_name.strip_suffix(".npy") else {
            return Err(format_err(
                path,
                format!("member `{member_name}` is not a .npy array"),
            ));
        };
        let (t, used) = read_npy_stream(&mut member, &where_, DataBound::Budget(budget))?;
        budget -= used;
        insert_unique(&mut out, name.to_string(), t, path)?;
    }
    Ok(out)
}

/// Parse `.npy` or `.npz` bytes, told apart by their magic. A `.npy` tensor
/// is named `name`. This is the entry point of the `npy_reader` fuzz target.
pub fn parse_npy_or_npz(
    bytes: &[u8],
    path: &str,
    name: &str,
    max_total: u64,
) -> Result<TensorFile> {
    if bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(b"PK\x05\x06") {
        return parse_npz(bytes, path, max_total);
    }
    let t = parse_npy(bytes, path)?;
    let mut out = TensorFile::default();
    insert_unique(&mut out, name.to_string(), t, path)?;
    Ok(out)
}

fn stem(path: &Path) -> Result<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            format_err(
                &path.display().to_string(),
                "the file name is not valid UTF-8",
            )
        })
}

/// Read a `.npy` file (one tensor, named after the file stem) or an `.npz`
/// archive (one tensor per member).
pub fn read_npy_or_npz(path: &Path) -> Result<TensorFile> {
    let bytes = read_bounded(path)?;
    parse_npy_or_npz(
        &bytes,
        &path.display().to_string(),
        &stem(path)?,
        max_file_bytes()?,
    )
}

/// The `*.npy` files of `dir` (not recursing), sorted: what
/// [`read_npy_dir`] reads, and what [`write_npy_dir`] would leave beside
/// a set it writes.
fn npy_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |e: std::io::Error| Error::Io {
        path: dir.display().to_string(),
        source: e,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "npy") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Read a directory: every `*.npy` in it (not recursing) plus an optional
/// `metadata.json`. Other files are ignored; a directory without any `.npy`
/// is an error (it is almost certainly the wrong directory).
pub fn read_npy_dir(dir: &Path) -> Result<TensorFile> {
    read_npy_dir_to(dir, max_file_bytes()?)
}

/// [`read_npy_dir`] with `limit` bytes for all its `.npy` files together.
fn read_npy_dir_to(dir: &Path, limit: u64) -> Result<TensorFile> {
    let shown = dir.display().to_string();
    let files = npy_files(dir)?;
    if files.is_empty() {
        return Err(format_err(&shown, "the directory holds no .npy files"));
    }
    let mut out = TensorFile::default();
    let mut total = 0u64;
    for p in files {
        let bytes = read_bounded(&p)?;
        total += bytes.len() as u64;
        if total > limit {
            return Err(Error::TooLarge {
                what: format!("the .npy files of {shown}"),
                bytes: total as u128,
                limit: limit as u128,
            });
        }
        let t = parse_npy(&bytes, &p.display().to_string())?;
        insert_unique(&mut out, stem(&p)?, t, &shown)?;
    }
    let meta = dir.join("metadata.json");
    if meta.is_file() {
        let bytes = read_bounded(&meta)?;
        out.metadata = parse_metadata(&bytes, &meta.display().to_string())?;
    }
    Ok(out)
}

/// The bytes of a `.npy` file holding `t`, as `numpy.save` writes it:
/// little-endian, C order, format 1.0 (2.0 for a header over 64 KiB), data
/// aligned to 64 bytes.
pub fn npy_bytes<T: Float>(t: &Tensor<T>) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128 + t.numel() * T::DTYPE.size_of());
    // `Float` is f32 or f64 (sealed); ndarray-npy needs the concrete type.
    let any: &dyn Any = t;
    let written = match (
        any.downcast_ref::<Tensor<f32>>(),
        any.downcast_ref::<Tensor<f64>>(),
    ) {
        (Some(t), _) => t.view().write_npy(&mut out),
        (_, Some(t)) => t.view().write_npy(&mut out),
        _ => unreachable!("Float is implemented for f32 and f64 only"),
    };
    written.map_err(|e| Error::Format {
        path: "<npy>".into(),
        detail: format!("cannot encode a tensor of shape {:?}: {e}", t.shape()),
    })?;
    Ok(out)
}

/// A tensor name usable as a file name: no path separators, not `.`/`..`.
fn check_file_name(name: &str, dir: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0'])
        || name == "metadata.json"
    {
        return Err(Error::Format {
            path: dir.to_string(),
            detail: format!("tensor name `{name}` cannot be a file name"),
        });
    }
    Ok(())
}

/// Write every tensor as `<dir>/<name>.npy` and the metadata as `<dir>/metadata.json`.
///
/// A directory that already holds `.npy` files of other names is refused
/// before anything is written: [`read_npy_dir`] reads every `.npy` of a
/// directory, so a stale tensor left beside the new ones (a golden set of
/// five levels overwritten by one of three) would be read back as part of
/// the set. Files of the same names are overwritten, each whole or not at
/// all (`write_atomically`); the metadata is written last. A set whose
/// writing fails part-way (an error is returned) may leave some of its files
/// beside the earlier set's others: write it again.
pub fn write_npy_dir<T: Float>(
    dir: &Path,
    tensors: &TensorMap<T>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let shown = dir.display().to_string();
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    for name in tensors.keys() {
        check_file_name(name, &shown)?;
    }
    if dir.is_dir() {
        let mut stale: Vec<String> = npy_files(dir)?
            .iter()
            .filter(|p| {
                !p.file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|n| tensors.contains_key(n))
            })
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        if !stale.is_empty() {
            let more = match stale.len() {
                n if n > 3 => format!(" and {} more", n - 3),
                _ => String::new(),
            };
            stale.truncate(3);
            return Err(Error::Format {
                path: shown,
                detail: format!(
                    "the directory already holds {}{more}, which this set does not write; a reader would take them as part of it (write into a new or empty directory)",
                    stale.join(", ")
                ),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (name, t) in tensors {
        let bytes = npy_bytes(t)?;
        crate::io::write_atomically(&dir.join(format!("{name}.npy")), |out| {
            out.write_all(&bytes)
        })?;
    }
    // Sorted keys, so the file is reproducible.
    let sorted: BTreeMap<_, _> = metadata.iter().collect();
    let text = serde_json::to_string_pretty(&sorted).map_err(|e| Error::Format {
        path: shown.clone(),
        detail: format!("cannot encode metadata: {e}"),
    })?;
    crate::io::write_atomically(&dir.join("metadata.json"), |out| {
        out.write_all(text.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An npy directory that holds `.npy` files of other names is refused
    /// before anything is written (a reader would take the stale files as part
    /// of the new set); the same names are overwritten.
    #[test]
    fn npy_directory_with_stale_tensors_is_refused_before_writing() {
        let dir = crate::io::scratch_dir("npy-stale");
        let t = |v: f64| Tensor::<f64>::from_vec(&[2], vec![v, -v]).unwrap();
        let six: TensorMap<f64> = (0..6).map(|i| (format!("t{i}"), t(i as f64))).collect();
        let meta = |v: &str| HashMap::from([("run".to_string(), v.to_string())]);
        write_npy_dir(&dir, &six, &meta("first")).unwrap();
        // The same names again: overwritten.
        let mut again = six.clone();
        again.insert("t0".into(), t(10.0));
        write_npy_dir(&dir, &again, &meta("second")).unwrap();
        let back = crate::io::read_tensor_file(&dir).unwrap();
        assert_eq!(back.metadata["run"], "second");
        assert_eq!(back.tensors.len(), 6);
        assert_eq!(back.tensors["t0"].to_f64().as_slice(), &[10.0, -10.0]);
        // One name: five stale files, three named and the rest counted.
        let one: TensorMap<f64> = again
            .iter()
            .take(1)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let e = write_npy_dir(&dir, &one, &meta("third")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(
                "already holds t1.npy, t2.npy, t3.npy and 2 more, which this set does not write"
            ),
            "{msg}"
        );
        // Nothing was written: the metadata is the second run's.
        assert_eq!(
            crate::io::read_tensor_file(&dir).unwrap().metadata["run"],
            "second"
        );
        // Exactly three stale files, then one: all named, with no count.
        for (gone, named) in [(4..6, "t1.npy, t2.npy, t3.npy"), (2..4, "t1.npy")] {
            for i in gone {
                std::fs::remove_file(dir.join(format!("t{i}.npy"))).unwrap();
            }
            let msg = write_npy_dir(&dir, &one, &meta("third"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("already holds {named}, which")),
                "{msg}"
            );
        }
        // Other files (not .npy) are not the reader's and do not count.
        std::fs::remove_file(dir.join("t1.npy")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"kept").unwrap();
        write_npy_dir(&dir, &one, &meta("third")).unwrap();
        let back = crate::io::read_tensor_file(&dir).unwrap();
        assert_eq!(back.metadata["run"], "third");
        assert_eq!(back.tensors.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn header(dict: &str) -> Vec<u8> {
        let mut v = NPY_MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        v
    }

    #[test]
    fn round_trip_keeps_shape_and_bits() {
        for shape in [vec![], vec![3], vec![2, 3], vec![1, 2, 1, 3], vec![0, 4]] {
            let n: usize = shape.iter().product();
            let t =
                Tensor::<f64>::from_vec(&shape, (0..n).map(|i| i as f64 - 0.5).collect()).unwrap();
            let b = npy_bytes(&t).unwrap();
            // NumPy's alignment: the data starts on a 64-byte boundary.
            assert_eq!((b.len() - n * 8) % 64, 0);
            let AnyTensor::F64(back) = parse_npy(&b, "x").unwrap() else {
                panic!("dtype changed")
            };
            assert_eq!(back.shape(), shape.as_slice());
            assert_eq!(back.as_slice(), t.as_slice());
            let t32: Tensor<f32> = t.cast();
            assert_eq!(
                parse_npy(&npy_bytes(&t32).unwrap(), "x").unwrap().dtype(),
                DType::F32
            );
        }
    }

    #[test]
    fn header_variants_numpy_writes_are_accepted() {
        for (dict, shape) in [
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                vec![2],
            ),
            (
                "{\"descr\":\"<f4\",\"shape\":(1,2),\"fortran_order\":False}",
                vec![1, 2],
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2L,), }   \n",
                vec![2],
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 1), }",
                vec![1, 2, 1],
            ),
            // Fortran order with one axis longer than 1: the C layout.
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2, 1), }",
                vec![1, 2, 1],
            ),
        ] {
            let mut b = header(dict);
            b.extend_from_slice(&[0u8; 8]);
            let t = parse_npy(&b, "x").unwrap_or_else(|e| panic!("{dict}: {e}"));
            assert_eq!(t.shape(), shape.as_slice());
        }
    }

    #[test]
    fn stream_edges_have_their_own_messages() {
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        let versioned = |major: u8, dict: &str, len: u32| {
            let mut v = NPY_MAGIC.to_vec();
            v.extend_from_slice(&[major, 0]);
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(dict.as_bytes());
            v
        };
        // Versions 2 and 3 carry a 4-byte header length.
        for major in [2, 3] {
            let mut b = versioned(major, dict, dict.len() as u32);
            b.extend_from_slice(&[0u8; 8]);
            assert_eq!(parse_npy(&b, "x").unwrap().shape(), &[2]);
        }
        let msg = |b: &[u8]| parse_npy(b, "x").unwrap_err().to_string();
        // A header of exactly the limit is read (here: cut short); one byte
        // more is refused before reading.
        let at_limit = versioned(2, "", MAX_HEADER_BYTES as u32);
        assert!(
            msg(&at_limit).contains("truncated .npy header"),
            "{}",
            msg(&at_limit)
        );
        let over = versioned(2, "", MAX_HEADER_BYTES as u32 + 1);
        assert!(msg(&over).contains("over the limit"), "{}", msg(&over));
        let mut v4 = versioned(4, dict, dict.len() as u32);
        v4.extend_from_slice(&[0u8; 8]);
        assert!(
            msg(&v4).contains("unsupported .npy version 4.0"),
            "{}",
            msg(&v4)
        );
        // Cut inside the preamble: truncation, not a read failure.
        assert!(msg(&NPY_MAGIC[..5]).contains("truncated .npy preamble"));
        // A reader that fails: its error, named.
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let e = read_npy_stream(&mut Broken, "x", DataBound::Present(100)).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read .npy preamble: disk on fire"),
            "{e}"
        );
        // Data exactly as long as the header says is read; one element more
        // claimed than the file holds is a lying header, refused before
        // reading (not a truncated read).
        let mut exact = header(dict);
        exact.extend_from_slice(&[0u8; 8]);
        assert_eq!(parse_npy(&exact, "x").unwrap().shape(), &[2]);
        let mut short = header(dict);
        short.extend_from_slice(&[0u8; 7]);
        assert!(
            msg(&short).contains("header claims 8 bytes"),
            "{}",
            msg(&short)
        );
        // Under a decompression budget: exactly the budget is read, a byte
        // less refuses the member as too large.
        let budget = |n: u64| read_npy_stream(&mut &exact[..], "x", DataBound::Budget(n));
        assert_eq!(budget(8).unwrap().1, 8);
        assert_eq!(budget(7).unwrap_err().kind(), "too_large");
    }

    #[test]
    fn fortran_order_with_two_long_axes_is_refused_even_with_its_data() {
        let mut b = header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }");
        b.extend_from_slice(&[0u8; 16]);
        let e = parse_npy(&b, "x").unwrap_err();
        assert!(e.to_string().contains("Fortran-order arrays"), "{e}");
    }

    #[test]
    fn bad_headers_have_typed_errors() {
        for (dict, kind) in [
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                "format",
            ),
            ("{'descr': '<f4', 'shape': (1,), }", "format"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
                "format",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
                "format",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
                "format",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
                "too_large",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }",
                "too_large",
            ),
            // Plausible size, but the file holds 4 bytes: refused before reading.
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000,), }",
                "format",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,) } junk",
                "format",
            ),
            // No escapes or line breaks inside header strings (read as a
            // dtype code they would be a dtype error, not a format one).
            (
                "{'descr': '<f\\4', 'fortran_order': False, 'shape': (1,), }",
                "format",
            ),
            (
                "{'descr': '<f4\n', 'fortran_order': False, 'shape': (1,), }",
                "format",
            ),
        ] {
            let mut b = header(dict);
            b.extend_from_slice(&[0u8; 4]);
            let e = parse_npy(&b, "x").unwrap_err();
            assert_eq!(e.kind(), kind, "{dict}: {e}");
        }
    }

    #[test]
    fn npz_members_are_named_and_bounded() {
        use std::io::Write;
        let t = Tensor::<f32>::from_vec(&[2], vec![1.0, 2.0]).unwrap();
        let mut buf = Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("p0.student.npy", opts).unwrap();
            z.write_all(&npy_bytes(&t).unwrap()).unwrap();
            z.finish().unwrap();
        }
        let bytes = buf.into_inner();
        let f = parse_npy_or_npz(&bytes, "a.npz", "a", 1 << 20).unwrap();
        assert_eq!(f.tensors["p0.student"].shape(), &[2]);
        // A budget smaller than the member's data: refused, typed.
        let e = parse_npz(&bytes, "a.npz", 4).unwrap_err();
        assert_eq!(e.kind(), "too_large");
    }

    /// An archive of stored members (any bytes) under the given names.
    fn npz_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut buf = Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            for (name, data) in members {
                z.start_file(*name, opts).unwrap();
                z.write_all(data).unwrap();
            }
            z.finish().unwrap();
        }
        buf.into_inner()
    }

    /// Every occurrence of `from` in `bytes` replaced by `to` (same length).
    fn patched(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let mut i = 0;
        while i + from.len() <= out.len() {
            if &out[i..i + from.len()] == from {
                out[i..i + from.len()].copy_from_slice(to);
            }
            i += 1;
        }
        out
    }

    #[test]
    fn a_directory_is_bounded_in_total_and_names_must_be_file_names() {
        let dir = crate::io::scratch_dir("npydir");
        let t = Tensor::<f32>::from_vec(&[2], vec![1.0, 2.0]).unwrap();
        let m = TensorMap::from([("a".to_string(), t.clone()), ("b".to_string(), t.clone())]);
        write_npy_dir(&dir, &m, &HashMap::new()).unwrap();
        let each = npy_bytes(&t).unwrap().len() as u64;
        // The two files together: exactly the limit is read, a byte less
        // refused, naming the total.
        assert_eq!(read_npy_dir_to(&dir, 2 * each).unwrap().tensors.len(), 2);
        match read_npy_dir_to(&dir, 2 * each - 1).unwrap_err() {
            Error::TooLarge { bytes, limit, .. } => {
                assert_eq!((bytes, limit), (2 * each as u128, 2 * each as u128 - 1))
            }
            e => panic!("{e}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
        for bad in ["", ".", "..", "a/b", "a\\b", "a\0b", "metadata.json"] {
            let e = check_file_name(bad, "d").unwrap_err();
            assert!(
                e.to_string().contains("cannot be a file name"),
                "{bad:?}: {e}"
            );
        }
        for good in [
            "p0.student",
            "grad.p0.gen_s.0.weight",
            "...",
            "metadata.jso",
        ] {
            check_file_name(good, "d").unwrap();
        }
    }

    #[test]
    fn member_count_and_decompression_budget_at_their_bounds() {
        // Directories only (skipped by the reader): MAX_NPZ_MEMBERS entries
        // are read, one more is refused before any is.
        let dirs = |count: usize| {
            let mut buf = Cursor::new(Vec::new());
            let mut z = zip::ZipWriter::new(&mut buf);
            for i in 0..count {
                z.add_directory(format!("{i}/"), zip::write::SimpleFileOptions::default())
                    .unwrap();
            }
            z.finish().unwrap();
            buf.into_inner()
        };
        let f = parse_npz(&dirs(MAX_NPZ_MEMBERS), "a.npz", 1 << 20).unwrap();
        assert!(f.tensors.is_empty());
        let e = parse_npz(&dirs(MAX_NPZ_MEMBERS + 1), "a.npz", 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("65537 members, over the limit"),
            "{e}"
        );
        // The budget is shared: two members of 8 data bytes fit 16 exactly,
        // not 15 (the second is refused).
        let two = |v: f32| npy_bytes(&Tensor::<f32>::from_vec(&[2], vec![v, v]).unwrap()).unwrap();
        let (a, b) = (two(1.0), two(2.0));
        let z = npz_of(&[("a.npy", &a), ("b.npy", &b)]);
        assert_eq!(parse_npz(&z, "a.npz", 16).unwrap().tensors.len(), 2);
        let e = parse_npz(&z, "a.npz", 15).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert!(e.to_string().contains("b.npy"), "{e}");
    }

    #[test]
    fn a_member_named_twice_is_refused_not_replaced() {
        let one = npy_bytes(&Tensor::<f64>::from_vec(&[1], vec![1.0]).unwrap()).unwrap();
        let five = npy_bytes(&Tensor::<f64>::from_vec(&[1], vec![5.0]).unwrap()).unwrap();
        let good = npz_of(&[("loss.npy", &one), ("lose.npy", &five)]);
        assert_eq!(parse_npz(&good, "a.npz", 1 << 20).unwrap().tensors.len(), 2);
        // The same archive with the second name made the first's: the zip
        // crate alone would read one `loss`, worth 5.
        let twice = patched(&good, b"lose.npy", b"loss.npy");
        let e = parse_npz(&twice, "a.npz", 1 << 20).unwrap_err();
        assert_eq!(e.kind(), "format");
        assert!(
            e.to_string().contains("member `loss.npy` appears twice"),
            "{e}"
        );
        // The walk steps over each entry's name, extra field and comment:
        // first two members with 300-byte names (their length's high byte is
        // 1) that differ only in their last letter, the first with a central
        // extra field, then the two of the same name.
        let long = format!("{}.npy", "n".repeat(296));
        let long2 = format!("{}m.npy", "n".repeat(295));
        let mut buf = Cursor::new(Vec::new());
        {
            use std::io::Write;
            let mut z = zip::ZipWriter::new(&mut buf);
            let mut opts = zip::write::FullFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            opts.add_extra_data(0xCAFE, vec![7u8; 300], true).unwrap();
            z.start_file(long.as_str(), opts).unwrap();
            z.write_all(&one).unwrap();
            z.start_file(long2.as_str(), zip::write::FullFileOptions::default())
                .unwrap();
            z.write_all(&one).unwrap();
            let plain = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            for name in ["loss.npy", "lose.npy"] {
                z.start_file(name, plain).unwrap();
                z.write_all(&five).unwrap();
            }
            z.finish().unwrap();
        }
        let good = buf.into_inner();
        assert_eq!(parse_npz(&good, "a.npz", 1 << 20).unwrap().tensors.len(), 4);
        let e = parse_npz(&patched(&good, b"lose.npy", b"loss.npy"), "a.npz", 1 << 20);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("member `loss.npy` appears twice")
        );
        // Two metadata members: which config holds is not for the reader to guess.
        let meta = npz_of(&[("metadata.json", b"{}"), ("metadata.jsom", b"{}")]);
        let meta = patched(&meta, b"metadata.jsom", b"metadata.json");
        let e = parse_npz(&meta, "a.npz", 1 << 20).unwrap_err();
        assert!(
            e.to_string()
                .contains("member `metadata.json` appears twice"),
            "{e}"
        );
    }

    #[test]
    fn a_metadata_key_twice_is_refused_not_replaced() {
        let ok = npz_of(&[("metadata.json", br#"{"config":"a","dtype":"f32"}"#)]);
        assert_eq!(
            parse_npz(&ok, "a.npz", 1 << 20).unwrap().metadata["config"],
            "a"
        );
        let twice = npz_of(&[("metadata.json", br#"{"config":"a","config":"b"}"#)]);
        let e = parse_npz(&twice, "a.npz", 1 << 20).unwrap_err();
        assert_eq!(e.kind(), "format");
        assert!(e.to_string().contains("the key `config` twice"), "{e}");
    }

    #[test]
    fn metadata_over_its_limit_is_refused_not_cut() {
        // Valid JSON padded past the limit with spaces, then garbage: read
        // up to the limit, it used to parse as a truncated text.
        let mut text = b"{}".to_vec();
        text.resize(MAX_METADATA_BYTES + 10, b' ');
        let ok = npz_of(&[("metadata.json", &text[..MAX_METADATA_BYTES])]);
        assert!(
            parse_npz(&ok, "a.npz", 1 << 20).is_ok(),
            "the limit itself is allowed"
        );
        text.extend_from_slice(b"garbage");
        let e = parse_npz(&npz_of(&[("metadata.json", &text)]), "a.npz", 1 << 20).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert!(e.to_string().contains("metadata"), "{e}");
    }
}
