//! One error type for the whole crate.
//!
//! Every failure a user can provoke with their own inputs (shapes, files,
//! configs, values) is a variant here, so the library never panics on bad
//! input and the CLI can print one readable line and exit non-zero.

use thiserror::Error;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every error dmkd reports.
#[derive(Debug, Error)]
pub enum Error {
    /// An op received operands whose shapes do not fit together.
    #[error("shape mismatch in {op}: {detail}")]
    ShapeMismatch {
        /// The op that refused them.
        op: &'static str,
        /// What does not fit.
        detail: String,
    },

    /// A tensor has a dimension of size zero where a non-empty one is needed.
    #[error("{what} has a zero-sized dimension (shape {shape:?})")]
    ZeroSized {
        /// The tensor or operand.
        what: String,
        /// Its shape.
        shape: Vec<usize>,
    },

    /// A tensor holds NaN or infinity where finite values are required.
    #[error("{tensor} holds a non-finite value ({value}) at index {index:?}")]
    NonFinite {
        /// The tensor's name.
        tensor: String,
        /// The multi-index of the first bad element.
        index: Vec<usize>,
        /// Its value (NaN or an infinity).
        value: f64,
    },

    /// An argument is outside its valid range (axis, stride, ratio, ...).
    #[error("invalid argument to {op}: {detail}")]
    InvalidArgument {
        /// The op or command that refused it.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },

    /// The configuration (JSON or programmatic) is invalid.
    #[error("invalid config: {0}")]
    Config(String),

    /// A tensor a file or map was expected to hold is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),

    /// A tensor is present but not expected: a misspelt name, usually, or an
    /// output (`loss`, `grad.*`) of a golden or evaluated file read back as
    /// an input, which the message then says how to allow.
    #[error("unexpected tensor `{0}`{hint}", hint = unexpected_hint(.0))]
    UnexpectedTensor(String),

    /// A tensor has the wrong element type.
    #[error("tensor `{name}` has dtype {got}, expected {expected}")]
    DType {
        /// The tensor's name (with its file).
        name: String,
        /// The accepted element types.
        expected: String,
        /// The element type found.
        got: String,
    },

    /// A named tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape it has.
        got: Vec<usize>,
    },

    /// A request would allocate more than the configured bound; refused before allocating.
    #[error("{what} needs {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What was asked for.
        what: String,
        /// The bytes it needs.
        bytes: u128,
        /// The bound.
        limit: u128,
    },

    /// A file is malformed: truncated, corrupt header, lying sizes.
    #[error("malformed file {path}: {detail}")]
    Format {
        /// The file (or archive member).
        path: String,
        /// What is wrong with it.
        detail: String,
    },

    /// An I/O error while reading or writing a file.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The autodiff tape was used in a way it does not support.
    #[error("autograd: {0}")]
    Autograd(String),

    /// The requested backend cannot run here (no CUDA device, feature not built).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),

    /// A failure inside a device backend (driver, compiler, launch).
    #[error("device error: {0}")]
    Device(String),
}

/// A message on one line: names and paths from files may hold newlines or
/// terminal escapes, shown escaped (the CLI prints `error: ` and this).
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Error {
    /// The error's message on one line (see [`one_line`]).
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }

    /// An [`Error::ShapeMismatch`] of `op`.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::ShapeMismatch {
            op,
            detail: detail.into(),
        }
    }

    /// An [`Error::InvalidArgument`] of `op`.
    pub fn arg(op: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }

    /// A short, stable name of the variant, used by tests and the CLI's JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ShapeMismatch { .. } => "shape_mismatch",
            Error::ZeroSized { .. } => "zero_sized",
            Error::NonFinite { .. } => "non_finite",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::Config(_) => "config",
            Error::MissingTensor(_) => "missing_tensor",
            Error::UnexpectedTensor(_) => "unexpected_tensor",
            Error::DType { .. } => "dtype",
            Error::TensorShape { .. } => "tensor_shape",
            Error::TooLarge { .. } => "too_large",
            Error::Format { .. } => "format",
            Error::Io { .. } => "io",
            Error::Autograd(_) => "autograd",
            Error::BackendUnavailable(_) => "backend_unavailable",
            Error::Device(_) => "device",
        }
    }
}

/// The advice an unexpected tensor's message ends with: none for a
/// misspelt or stray name (allowing extra tensors would hide the mistake);
/// for an output of an evaluation, how to read such a file's inputs and
/// parameters and leave its outputs aside.
fn unexpected_hint(name: &str) -> &'static str {
    if crate::verify::is_required_output(name) {
        " (an output, as a golden or evaluated file holds: to take that file's \
         inputs and parameters, allow extra tensors: `dmkd eval --allow-extra`, \
         `allow_extra` in Rust and Python)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs read back as inputs get the advice to allow extra tensors;
    /// a misspelt input, parameter or stray box tensor does not.
    #[test]
    fn an_unexpected_output_says_how_to_read_a_golden_file() {
        for name in ["grad.p0.student", "loss", "p3.loss"] {
            let msg = Error::UnexpectedTensor(name.into()).to_string();
            assert!(
                msg.starts_with(&format!("unexpected tensor `{name}` (an output"))
                    && msg.contains("--allow-extra")
                    && msg.ends_with(')'),
                "{msg}"
            );
        }
        for name in ["p0.studnet", "p0.fusoin", "gt_boxes.1", "p0.loss.x"] {
            let msg = Error::UnexpectedTensor(name.into()).to_string();
            assert_eq!(msg, format!("unexpected tensor `{name}`"));
        }
    }

    #[test]
    fn one_line_escapes_control_characters() {
        assert_eq!(one_line("a\nb\tc\u{1b}[31m d"), "a\\nb\\tc\\u{1b}[31m d");
        let e = Error::MissingTensor("p0.\nstudent".into());
        assert_eq!(e.one_line(), "missing tensor `p0.\\nstudent`");
        assert_eq!(one_line("plain é"), "plain é");
    }
}
