//! The `.npy` header dict, e.g.
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`, parsed
//! strictly: only the three keys NumPy writes, string, boolean and tuple
//! values, at most [`MAX_RANK`] dimensions, no escapes, no nesting (so a
//! crafted header cannot recurse or allocate beyond its own bytes, which
//! the caller has bounded by [`MAX_HEADER_BYTES`]).

use crate::error::{Error, Result};
use crate::tensor::DType;

/// Longest header accepted. NumPy itself refuses headers over 10,000 bytes
/// by default; real headers are under 200. The bound keeps a lying header
/// length (a u32 in versions 2 and 3) from allocating gigabytes.
pub const MAX_HEADER_BYTES: usize = 1 << 16;
/// Most dimensions accepted (NumPy's own limit is 64).
pub const MAX_RANK: usize = 64;

pub(super) fn format_err(path: &str, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_string(),
        detail: detail.into(),
    }
}

/// What a `.npy` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// `<f4` (f32) or `<f8` (f64); anything else is refused.
    pub dtype: DType,
    /// The array's shape (C order).
    pub shape: Vec<usize>,
}

/// A value of the header's Python-literal dict (only what headers use).
#[derive(Debug)]
enum Lit {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
    /// A list: the descr of a structured dtype; never an accepted value.
    List,
}

/// A strict parser of the header dict, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
struct LitParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl LitParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.ws();
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at byte {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == q {
                let v = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(v);
            }
            // Header strings are dtype codes and key names: no escapes.
            if c == b'\\' || c == b'\n' {
                return Err(format!(
                    "unsupported character in a string at byte {}",
                    self.i
                ));
            }
            self.i += 1;
        }
        Err("unterminated string".into())
    }

    fn int(&mut self) -> std::result::Result<u64, String> {
        self.ws();
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or_else(|| "a dimension does not fit in 64 bits".to_string())?;
            self.i += 1;
        }
        if self.i == start {
            return Err(format!(
                "expected a non-negative integer at byte {}",
                self.i
            ));
        }
        // Python 2 wrote long integers as `3L`.
        if self.peek() == Some(b'L') {
            self.i += 1;
        }
        Ok(v)
    }

    fn value(&mut self) -> std::result::Result<Lit, String> {
        self.ws();
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            return Ok(Lit::Bool(true));
        }
        if rest.starts_with(b"False") {
            self.i += 5;
            return Ok(Lit::Bool(false));
        }
        match self.peek() {
            Some(b'\'' | b'"') => self.string().map(Lit::Str),
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    if self.eat(b')') {
                        return Ok(Lit::Tuple(dims));
                    }
                    if dims.len() >= MAX_RANK {
                        return Err(format!("more than {MAX_RANK} dimensions"));
                    }
                    dims.push(self.int()?);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        return Ok(Lit::Tuple(dims));
                    }
                }
            }
            Some(b'[') => Ok(Lit::List),
            _ => Err(format!("unsupported value at byte {}", self.i)),
        }
    }

    /// The dict's entries, in order; a list value ends the parse early
    /// (its contents are never needed: a list descr is refused as a dtype).
    fn dict(&mut self) -> std::result::Result<Vec<(String, Lit)>, String> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        loop {
            if self.eat(b'}') {
                break;
            }
            let key = self.string()?;
            self.expect(b':')?;
            let v = self.value()?;
            let list = matches!(v, Lit::List);
            out.push((key, v));
            if list {
                return Ok(out);
            }
            if !self.eat(b',') {
                self.expect(b'}')?;
                break;
            }
        }
        self.ws();
        if self.i != self.s.len() {
            return Err(format!(
                "unexpected bytes after the dict at byte {}",
                self.i
            ));
        }
        Ok(out)
    }
}

/// Interpret the header dict text (the bytes after the length field).
pub fn parse_header_dict(text: &[u8], path: &str) -> Result<NpyHeader> {
    let entries = LitParser { s: text, i: 0 }
        .dict()
        .map_err(|e| format_err(path, format!("bad .npy header: {e}")))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, v) in entries {
        match (key.as_str(), v) {
            ("descr", Lit::Str(s)) => descr = Some(s),
            ("descr", Lit::List) => {
                return Err(Error::DType {
                    name: path.to_string(),
                    expected: "<f4 or <f8".into(),
                    got: "a structured dtype".into(),
                });
            }
            ("fortran_order", Lit::Bool(b)) => fortran = Some(b),
            ("shape", Lit::Tuple(t)) => shape = Some(t),
            (k, v) => {
                return Err(format_err(
                    path,
                    format!("bad .npy header: unexpected entry `{k}`: {v:?}"),
                ));
            }
        }
    }
    let (Some(descr), Some(fortran), Some(shape)) = (descr, fortran, shape) else {
        return Err(format_err(
            path,
            "bad .npy header: it needs `descr`, `fortran_order` and `shape`",
        ));
    };
    let dtype = match descr.as_str() {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        other => {
            let why = if other.starts_with('>') {
                " (big-endian; convert with arr.astype('<f4'))"
            } else {
                ""
            };
            return Err(Error::DType {
                name: path.to_string(),
                expected: "<f4 or <f8 (little-endian f32 or f64)".into(),
                got: format!("{other}{why}"),
            });
        }
    };
    let shape = shape
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| format_err(path, "a dimension exceeds usize")))
        .collect::<Result<Vec<usize>>>()?;
    // In Fortran order only arrays with at most one non-trivial axis have
    // the C layout; anything else would be silently transposed.
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(format_err(
            path,
            "Fortran-order arrays are not supported (save with np.ascontiguousarray)",
        ));
    }
    Ok(NpyHeader { dtype, shape })
}
