//! How much memory a problem may take, checked before anything is
//! allocated: the machine's physical memory (or `DMKD_MAX_PROBLEM_BYTES`)
//! against a lower bound on what the problem needs.

use super::{LevelShape, ParamSpec};
use crate::error::{Error, Result};
use crate::tensor::Float;

/// Default bound on a problem's memory when `/proc/meminfo` cannot be read:
/// `MAX_ELEMENTS` f32 values (64 GiB).
pub const DEFAULT_MAX_PROBLEM_BYTES: u64 = (crate::tensor::MAX_ELEMENTS as u64) * 4;

/// The memory a problem may need: `DMKD_MAX_PROBLEM_BYTES` if set (a value
/// that is not a byte count is an error), else the machine's physical
/// memory (MemTotal), capped at [`DEFAULT_MAX_PROBLEM_BYTES`].
pub fn max_problem_bytes() -> Result<u64> {
    if let Some(v) = crate::io::bounded::byte_limit_from_env("DMKD_MAX_PROBLEM_BYTES")? {
        return Ok(v);
    }
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    Ok(total.map_or(DEFAULT_MAX_PROBLEM_BYTES, |t| {
        t.min(DEFAULT_MAX_PROBLEM_BYTES)
    }))
}

/// A lower bound on a problem's memory, in bytes: each parameter and its
/// gradient, the inputs, and the four generator outputs each level keeps
/// for the backward pass.
pub fn footprint_bytes(shapes: &[LevelShape], specs: &[Vec<ParamSpec>], elem_size: usize) -> u128 {
    let mut elements: u128 = 0;
    for (shape, level_specs) in shapes.iter().zip(specs) {
        for spec in level_specs {
            let n = spec
                .shape
                .iter()
                .fold(1u128, |a, &d| a.saturating_mul(d as u128));
            elements = elements.saturating_add(n.saturating_mul(2));
        }
        let plane = (shape.n as u128) * (shape.h as u128) * (shape.w as u128);
        let inputs = plane.saturating_mul(shape.cs as u128 + shape.c as u128);
        let activations = plane.saturating_mul(shape.c as u128).saturating_mul(4);
        elements = elements.saturating_add(inputs).saturating_add(activations);
    }
    elements.saturating_mul(elem_size as u128)
}

/// Refuse a problem whose memory surely exceeds [`max_problem_bytes`],
/// before any parameter is initialised. Each tensor fits `MAX_ELEMENTS`, but
/// a 80 KB teacher of shape `[1, 40000, 1, 1]` asks for four 40000x40000x3x3
/// generator weights (230 GB in f32): without this check it would abort on a
/// failed allocation. The estimate ([`footprint_bytes`]) is a lower bound, so
/// a refusal is never wrong.
pub(crate) fn check_footprint<T: Float>(
    shapes: &[LevelShape],
    specs: &[Vec<ParamSpec>],
) -> Result<()> {
    let bytes = footprint_bytes(shapes, specs, T::DTYPE.size_of());
    within_limit(bytes, max_problem_bytes()? as u128)
}

/// `bytes` may use up to `limit` bytes, inclusive.
fn within_limit(bytes: u128, limit: u128) -> Result<()> {
    if bytes > limit {
        return Err(Error::TooLarge {
            what: "the problem (parameters, gradients, inputs and activations; a lower bound)"
                .into(),
            bytes,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::params;

    #[test]
    fn footprint_counts_params_twice_inputs_and_four_activations() {
        let shape = LevelShape {
            n: 2,
            cs: 3,
            c: 4,
            h: 5,
            w: 6,
        };
        let specs = vec![vec![ParamSpec::new(
            "a".into(),
            &[4, 3, 1, 1],
            params::Init::Zeros,
        )]];
        // params 12 * 2, inputs 60 * (3 + 4), activations 60 * 4 * 4, in f32.
        let want = (12 * 2 + 60 * 7 + 60 * 16) * 4;
        assert_eq!(footprint_bytes(&[shape], &specs, 4), want as u128);
        assert_eq!(
            footprint_bytes(&[shape, shape], &[specs[0].clone(), vec![]], 8),
            (want * 2 - 24 * 4) as u128 * 2
        );
    }

    #[test]
    fn the_default_cap_is_max_elements_of_f32() {
        // The documented fallback: 2^34 f32 values, 64 GiB, so a problem
        // whose tensors each fit `MAX_ELEMENTS` in f32 is not refused by it;
        // MemTotal is capped by it.
        assert_eq!(DEFAULT_MAX_PROBLEM_BYTES, 64 << 30);
        if std::env::var_os("DMKD_MAX_PROBLEM_BYTES").is_none() {
            assert!(max_problem_bytes().unwrap() <= DEFAULT_MAX_PROBLEM_BYTES);
        }
    }

    #[test]
    fn the_memory_limit_is_inclusive() {
        assert!(within_limit(100, 100).is_ok());
        assert_eq!(within_limit(101, 100).unwrap_err().kind(), "too_large");
    }
}
