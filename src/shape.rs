//! Shape arithmetic shared by ops and backends: broadcasting and strides.

use crate::error::{Error, Result};

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

/// NumPy broadcasting: align shapes on the right; each pair of dims must be
/// equal or one of them 1. An output too large to allocate is refused
/// (`[2^18, 1] + [1, 2^17]` asks for 2^35 elements).
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for (k, o) in out.iter_mut().enumerate() {
        let da = dim_from_right(a, r - 1 - k);
        let db = dim_from_right(b, r - 1 - k);
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::shape(
                    op,
                    format!("shapes {a:?} and {b:?} do not broadcast"),
                ));
            }
        };
    }
    crate::tensor::checked_numel(&out)?;
    Ok(out)
}

/// Can `from` be broadcast to `to` (without changing `to`)?
pub fn broadcasts_to(from: &[usize], to: &[usize]) -> bool {
    if from.len() > to.len() {
        return false;
    }
    (0..from.len()).all(|k| {
        let f = dim_from_right(from, k);
        f == 1 || f == dim_from_right(to, k)
    })
}

fn dim_from_right(s: &[usize], k: usize) -> usize {
    if k < s.len() { s[s.len() - 1 - k] } else { 1 }
}

/// Strides for reading a tensor of shape `from` as if it had shape `to`
/// (broadcast dims get stride 0). `from` must broadcast to `to`.
pub fn broadcast_strides(from: &[usize], to: &[usize]) -> Vec<usize> {
    let fs = strides(from);
    let off = to.len() - from.len();
    (0..to.len())
        .map(|k| {
            if k < off || from[k - off] == 1 {
                0
            } else {
                fs[k - off]
            }
        })
        .collect()
}

/// Validate a list of axes for a tensor of rank `rank`: in range, no repeats.
pub fn check_axes(op: &'static str, axes: &[usize], rank: usize) -> Result<()> {
    for (i, &a) in axes.iter().enumerate() {
        if a >= rank {
            return Err(Error::arg(
                op,
                format!("axis {a} out of range for rank {rank}"),
            ));
        }
        if axes[..i].contains(&a) {
            return Err(Error::arg(op, format!("axis {a} repeated")));
        }
    }
    Ok(())
}

/// The shape after summing `axes` with the dims kept as 1.
pub fn reduced_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .map(|(k, &d)| if axes.contains(&k) { 1 } else { d })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_rules() {
        assert_eq!(
            broadcast_shapes("t", &[2, 3, 4], &[3, 1]).unwrap(),
            vec![2, 3, 4]
        );
        assert_eq!(broadcast_shapes("t", &[], &[2, 2]).unwrap(), vec![2, 2]);
        assert!(broadcast_shapes("t", &[2, 3], &[4, 3]).is_err());
        assert!(broadcasts_to(&[1, 3], &[5, 2, 3]));
        assert!(!broadcasts_to(&[2, 3], &[5, 1, 3]));
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), vec![0, 1, 0]);
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
    }

    #[test]
    fn broadcasting_edges() {
        // Equal shapes, and a longer `from` (never broadcasts).
        assert!(broadcasts_to(&[2, 3], &[2, 3]));
        assert!(broadcasts_to(&[], &[2, 3]));
        assert!(!broadcasts_to(&[1, 2, 3], &[2, 3]));
        assert!(!broadcasts_to(&[3], &[3, 2]));
        // A zero-sized dim broadcasts against 1 only (NumPy).
        assert_eq!(broadcast_shapes("t", &[0, 3], &[1, 3]).unwrap(), vec![0, 3]);
        assert_eq!(broadcast_shapes("t", &[4, 1], &[5]).unwrap(), vec![4, 5]);
        assert!(broadcast_shapes("t", &[0], &[2]).is_err());
        let e = broadcast_shapes("add", &[2], &[3]).unwrap_err().to_string();
        assert!(e.contains("[2] and [3] do not broadcast"), "{e}");
        // Each operand fits, the broadcast output would not.
        let e = broadcast_shapes("add", &[1 << 18, 1], &[1, 1 << 17]).unwrap_err();
        assert_eq!(e.kind(), "too_large");
        assert!(broadcast_shapes("add", &[1 << 17, 1], &[1, 1 << 17]).is_ok());
        // Strides: scalars and vectors, and broadcast dims read at stride 0.
        assert_eq!(strides(&[]), Vec::<usize>::new());
        assert_eq!(strides(&[5]), vec![1]);
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), vec![3, 1]);
        assert_eq!(
            broadcast_strides(&[4, 1, 3], &[2, 4, 5, 3]),
            vec![0, 3, 0, 1]
        );
        assert_eq!(broadcast_strides(&[], &[2, 2]), vec![0, 0]);
    }

    #[test]
    fn axes_are_validated() {
        assert!(check_axes("t", &[0, 2], 3).is_ok());
        assert!(check_axes("t", &[3], 3).is_err());
        assert!(check_axes("t", &[1, 1], 3).is_err());
        assert_eq!(reduced_shape(&[2, 3, 4], &[0, 2]), vec![1, 3, 1]);
    }
}
