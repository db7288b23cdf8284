//! Validating another implementation: compare its output file with an
//! expected (golden) file, tensor by tensor.
//!
//! An element passes when `|a - e| <= atol + rtol * |e| + stol * max|e|`:
//! NumPy's `allclose` plus a floor scaled by the tensor's largest expected
//! magnitude, because an implementation in another summation order or
//! precision is accurate relative to the tensor, not to an element that
//! happens to be near zero. NaN matches only NaN. Per tensor the report gives the max
//! absolute and relative errors, the worst element (the one furthest
//! outside its tolerance, by multi-index, with both values), the ULP
//! distance in the actual tensor's precision, and pass/fail.
//!
//! Which names must be present: the outputs (`loss`, `p{l}.loss`,
//! `grad.*`) must be in the actual file; inputs, parameters and debug
//! tensors are compared when both files have them. A tensor only the
//! actual file has is reported as extra and fails unless allowed.

use serde::Serialize;

use crate::named::{AnyTensor, TensorFile};
use crate::tensor::{DType, unravel};

/// Tolerances of a comparison.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerance {
    /// Relative to `|e|`.
    pub rtol: f64,
    /// Absolute.
    pub atol: f64,
    /// Absolute tolerance in units of the tensor's largest |expected|.
    pub stol: f64,
}

/// What every tolerance must be: finite and >= 0.
pub fn valid_tolerance(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

impl Tolerance {
    /// The tolerance that is not finite and >= 0, by name, if any. A negative
    /// tolerance would pass every element (a negative bound makes every
    /// ratio negative), so [`compare_tensor`] fails every tensor under one.
    pub fn invalid(&self) -> Option<(&'static str, f64)> {
        [
            ("rtol", self.rtol),
            ("atol", self.atol),
            ("stol", self.stol),
        ]
        .into_iter()
        .find(|&(_, v)| !valid_tolerance(v))
    }
}

/// Outcome of one tensor's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Within tolerance everywhere.
    Pass,
    /// Some element outside its tolerance.
    Fail,
    /// A required output the actual file lacks.
    Missing,
    /// A tensor only the actual file has.
    Extra,
    /// Shapes differ.
    ShapeMismatch,
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// The tensor's name.
    pub name: String,
    /// The verdict.
    pub status: Status,
    /// The expected shape.
    pub shape: Vec<usize>,
    /// The expected tensor's precision, if present.
    pub expected_dtype: Option<DType>,
    /// The actual tensor's precision, if present.
    pub actual_dtype: Option<DType>,
    /// `max |a - e|`.
    pub max_abs_error: f64,
    /// `max |a - e| / |e|` over the elements that differ (inf where `e = 0`).
    pub max_rel_error: f64,
    /// `||a - e||_2 / ||e||_2`: robust where elements are near zero. Elements
    /// NaN on both sides (a match) are left out of both norms; a NaN on one
    /// side only makes it NaN or inf.
    pub norm_rel_error: f64,
    /// Multi-index of the element furthest outside its tolerance.
    pub worst_index: Vec<usize>,
    /// The expected value at the worst element.
    pub worst_expected: f64,
    /// The actual value there.
    pub worst_actual: f64,
    /// Largest distance in units in the last place of the actual tensor's
    /// precision (f32 ULPs for an f32 implementation).
    pub max_ulp: u64,
    /// Elements outside tolerance.
    pub failures: usize,
    /// Why it failed, in words (empty when it passed).
    pub detail: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The tolerances applied.
    pub tolerance: Tolerance,
    /// Every tensor passed, and at least one was in both files.
    pub passed: bool,
    /// One row per tensor.
    pub tensors: Vec<TensorReport>,
}

impl Report {
    /// The tensors both files have (the comparisons made): missing and
    /// extra tensors are rows too, but compare nothing.
    pub fn compared(&self) -> usize {
        compared(&self.tensors)
    }
}

fn compared(rows: &[TensorReport]) -> usize {
    rows.iter().filter(|r| r.expected_dtype.is_some()).count()
}

/// True for names an implementation must produce.
pub fn is_required_output(name: &str) -> bool {
    name == "loss"
        || name.starts_with("grad.")
        || (name.starts_with('p') && name.ends_with(".loss") && name.matches('.').count() == 1)
}

/// Map f32 bits to integers ordered like the floats, so that ULP distance is a difference.
fn ordered32(x: f32) -> i64 {
    let b = x.to_bits() as i32;
    (if b < 0 { i32::MIN.wrapping_sub(b) } else { b }) as i64
}

fn ordered64(x: f64) -> i128 {
    let b = x.to_bits() as i64;
    (if b < 0 { i64::MIN.wrapping_sub(b) } else { b }) as i128
}

/// ULP distance between `a` and `e` measured in `dtype`.
pub fn ulp_distance(a: f64, e: f64, dtype: DType) -> u64 {
    if a.is_nan() || e.is_nan() {
        return if a.is_nan() && e.is_nan() {
            0
        } else {
            u64::MAX
        };
    }
    match dtype {
        DType::F32 => (ordered32(a as f32) - ordered32(e as f32)).unsigned_abs(),
        DType::F64 => (ordered64(a) - ordered64(e))
            .unsigned_abs()
            .min(u64::MAX as u128) as u64,
    }
}

fn empty_row(name: &str, status: Status, detail: String) -> TensorReport {
    TensorReport {
        name: name.to_string(),
        status,
        shape: Vec::new(),
        expected_dtype: None,
        actual_dtype: None,
        max_abs_error: f64::NAN,
        max_rel_error: f64::NAN,
        norm_rel_error: f64::NAN,
        worst_index: Vec::new(),
        worst_expected: f64::NAN,
        worst_actual: f64::NAN,
        max_ulp: 0,
        failures: 0,
        detail,
    }
}

/// Compare one tensor.
pub fn compare_tensor(
    name: &str,
    expected: &AnyTensor,
    actual: &AnyTensor,
    tol: Tolerance,
) -> TensorReport {
    let mut row = empty_row(name, Status::Pass, String::new());
    row.expected_dtype = Some(expected.dtype());
    row.actual_dtype = Some(actual.dtype());
    row.shape = expected.shape().to_vec();
    if expected.shape() != actual.shape() {
        row.status = Status::ShapeMismatch;
        row.detail = format!(
            "expected shape {:?}, got {:?}",
            expected.shape(),
            actual.shape()
        );
        return row;
    }
    if let Some((what, v)) = tol.invalid() {
        row.status = Status::Fail;
        row.detail = format!("{what} {v} is not finite and >= 0");
        return row;
    }
    let (e, a) = (expected.to_f64(), actual.to_f64());
    let max_e = e
        .as_slice()
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = tol.atol + tol.stol * max_e;
    let (mut max_abs, mut max_rel, mut worst_ratio) = (0.0f64, 0.0f64, -1.0f64);
    let mut worst = 0usize;
    for (i, (&ev, &av)) in e.as_slice().iter().zip(a.as_slice()).enumerate() {
        let ulp = ulp_distance(av, ev, actual.dtype());
        row.max_ulp = row.max_ulp.max(ulp);
        let ratio = if ev.is_nan() && av.is_nan() {
            0.0
        } else if ev.is_nan() || av.is_nan() {
            f64::INFINITY
        } else if ev == av {
            // Equal infinities (and exact equality) pass.
            0.0
        } else {
            let diff = (av - ev).abs();
            max_abs = max_abs.max(diff);
            max_rel = max_rel.max(if ev == 0.0 {
                f64::INFINITY
            } else {
                diff / ev.abs()
            });
            diff / (floor + tol.rtol * ev.abs())
        };
        if ratio > 1.0 || ratio.is_nan() {
            row.failures += 1;
        }
        if ratio > worst_ratio || (ratio.is_nan() && worst_ratio.is_finite()) {
            worst_ratio = ratio;
            worst = i;
        }
    }
    row.max_abs_error = max_abs;
    row.max_rel_error = max_rel;
    // Both norms are summed in units of the power of two at the largest
    // finite magnitude among the values and their differences, so that
    // neither squares of 1e-200 (underflow: a difference reported as none)
    // nor of 1e200 (overflow: inf / inf) lose the ratio. A power of two
    // scales exactly: in the normal range the sums are those of the
    // unscaled values, bit for bit.
    let scale = e
        .as_slice()
        .iter()
        .zip(a.as_slice())
        .map(|(&ev, &av)| (av - ev).abs())
        .filter(|v| v.is_finite())
        .fold(max_e, f64::max);
    let unit = if scale > 0.0 {
        // The biased exponent field; 0 (subnormal) is 2^-1022's.
        let exp = ((scale.to_bits() >> 52) as i32).max(1) - 1023;
        2f64.powi(-exp)
    } else {
        1.0
    };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&ev, &av) in e.as_slice().iter().zip(a.as_slice()) {
        if ev.is_nan() && av.is_nan() {
            // A match (as element by element); it has no magnitude to add.
            continue;
        }
        // Equal values (equal infinities too) differ by nothing.
        let d = if av == ev { 0.0 } else { (av - ev) * unit };
        let x = ev * unit;
        num += d * d;
        den += x * x;
    }
    row.norm_rel_error = if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    if e.numel() > 0 {
        row.worst_index = unravel(worst, e.shape());
        row.worst_expected = e.as_slice()[worst];
        row.worst_actual = a.as_slice()[worst];
    }
    if row.failures > 0 {
        row.status = Status::Fail;
        row.detail = format!(
            "{} of {} elements outside tolerance",
            row.failures,
            e.numel()
        );
    }
    row
}

/// The report as the CLI prints it: a header naming both sides, one row per
/// tensor (max abs / max rel / norm-wise error, worst index, ULP distance,
/// status) and a PASS / FAIL line; every line ends in a newline.
pub fn table(report: &Report, expected: &str, actual: &str) -> String {
    use std::fmt::Write;
    let tol = report.tolerance;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "verify {actual} against {expected} (pass: |a - e| <= {:e} + {:e} |e| + {:e} max|e|)",
        tol.atol, tol.rtol, tol.stol
    );
    let _ = writeln!(
        out,
        "{:<34} {:>5} {:>11} {:>11} {:>11} {:>14} {:>10}  status",
        "tensor", "dtype", "max abs", "max rel", "norm rel", "worst at", "ulp"
    );
    for r in &report.tensors {
        let dtype = r.actual_dtype.map_or("-".to_string(), |d| d.to_string());
        let status = match r.status {
            Status::Pass => "ok".to_string(),
            Status::Fail => format!("FAIL ({})", r.detail),
            Status::Missing => "MISSING".to_string(),
            Status::Extra => "EXTRA".to_string(),
            Status::ShapeMismatch => format!("SHAPE ({})", r.detail),
        };
        let _ = writeln!(
            out,
            "{:<34} {:>5} {:>11.3e} {:>11.3e} {:>11.3e} {:>14} {:>10}  {}",
            r.name,
            dtype,
            r.max_abs_error,
            r.max_rel_error,
            r.norm_rel_error,
            format!("{:?}", r.worst_index),
            r.max_ulp,
            status
        );
    }
    let failed = report
        .tensors
        .iter()
        .filter(|r| r.status != Status::Pass)
        .count();
    if report.compared() == 0 {
        let _ = writeln!(out, "FAIL: no tensor is in both files, nothing compared");
    } else {
        let _ = writeln!(
            out,
            "{}: {} tensors compared, {failed} failed",
            if report.passed { "PASS" } else { "FAIL" },
            report.tensors.len()
        );
    }
    out
}

/// Compare an implementation's file with the expected file.
pub fn compare(
    expected: &TensorFile,
    actual: &TensorFile,
    tol: Tolerance,
    allow_extra: bool,
) -> Report {
    let mut rows = Vec::new();
    for (name, e) in &expected.tensors {
        match actual.tensors.get(name) {
            Some(a) => rows.push(compare_tensor(name, e, a, tol)),
            None if is_required_output(name) => rows.push(empty_row(
                name,
                Status::Missing,
                "absent from the actual file".into(),
            )),
            None => {}
        }
    }
    for name in actual.tensors.keys() {
        if !expected.tensors.contains_key(name) {
            let status = if allow_extra {
                Status::Pass
            } else {
                Status::Extra
            };
            rows.push(empty_row(name, status, "not in the expected file".into()));
        }
    }
    // Allowed extras pass, so files with no tensor in common would read as a
    // pass with nothing compared: that is a failure.
    let passed = compared(&rows) > 0 && rows.iter().all(|r| r.status == Status::Pass);
    Report {
        tolerance: tol,
        passed,
        tensors: rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    fn file(items: Vec<(&str, AnyTensor)>) -> TensorFile {
        TensorFile {
            tensors: items.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            metadata: Default::default(),
        }
    }
    fn f64t(shape: &[usize], v: Vec<f64>) -> AnyTensor {
        AnyTensor::F64(Tensor::from_vec(shape, v).unwrap())
    }
    const TOL: Tolerance = Tolerance {
        rtol: 1e-6,
        atol: 0.0,
        stol: 0.0,
    };

    #[test]
    fn the_table_has_a_row_per_tensor_and_a_verdict() {
        let e = file(vec![
            ("loss", f64t(&[], vec![1.0])),
            ("grad.x", f64t(&[2], vec![1.0, 2.0])),
        ]);
        let a = file(vec![
            ("loss", f64t(&[], vec![1.0])),
            ("grad.x", f64t(&[2], vec![1.0, 2.5])),
        ]);
        let text = table(&compare(&e, &a, TOL, false), "E", "A");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("verify A against E (pass: |a - e| <= 0e0 + 1e-6 |e|"));
        assert!(lines[1].starts_with("tensor") && lines[1].ends_with("status"));
        let row = lines.iter().find(|l| l.starts_with("grad.x")).unwrap();
        assert!(row.contains("5.000e-1") && row.contains("[1]") && row.contains("FAIL"));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("loss") && l.ends_with("  ok"))
        );
        assert_eq!(lines[4], "FAIL: 2 tensors compared, 1 failed");
        let pass = table(&compare(&e, &e, TOL, false), "E", "E");
        assert!(pass.ends_with("PASS: 2 tensors compared, 0 failed\n"));
    }

    #[test]
    fn finds_the_worst_element_and_its_index() {
        let e = f64t(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let a = f64t(&[2, 2], vec![1.0, 2.0 + 1e-3, 3.0, 4.0 + 1e-4]);
        let r = compare_tensor("x", &e, &a, TOL);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.worst_index, vec![0, 1]);
        assert_eq!(r.failures, 2);
        assert!((r.max_abs_error - 1e-3).abs() < 1e-12);
        assert!((r.max_rel_error - 5e-4).abs() < 1e-12);
        assert_eq!(r.worst_expected, 2.0);
    }

    #[test]
    fn ulps_are_counted_in_f32_for_f32_outputs() {
        let x = 1.0f32;
        let next = f32::from_bits(x.to_bits() + 3);
        assert_eq!(ulp_distance(next as f64, 1.0, DType::F32), 3);
        assert_eq!(ulp_distance(-0.0, 0.0, DType::F32), 0);
        assert_eq!(
            ulp_distance(
                f32::from_bits(1) as f64,
                -(f32::from_bits(1) as f64),
                DType::F32
            ),
            2
        );
        let e = f64t(&[1], vec![1.0]);
        let a = AnyTensor::F32(Tensor::from_vec(&[1], vec![next]).unwrap());
        let r = compare_tensor(
            "x",
            &e,
            &a,
            Tolerance {
                rtol: 1e-5,
                atol: 0.0,
                stol: 0.0,
            },
        );
        assert_eq!(r.max_ulp, 3);
        assert_eq!(r.status, Status::Pass);
    }

    #[test]
    fn the_scaled_floor_forgives_near_zero_elements_only() {
        let e = f64t(&[3], vec![100.0, 1e-9, -50.0]);
        let a = f64t(&[3], vec![100.0, 2e-9, -50.0]);
        let strict = compare_tensor("x", &e, &a, TOL);
        assert_eq!(strict.status, Status::Fail);
        let scaled = Tolerance {
            rtol: 1e-6,
            atol: 0.0,
            stol: 1e-10,
        };
        assert_eq!(compare_tensor("x", &e, &a, scaled).status, Status::Pass);
        let far = f64t(&[3], vec![100.0, 1e-7, -50.0]);
        assert_eq!(compare_tensor("x", &e, &far, scaled).status, Status::Fail);
    }

    #[test]
    fn ulps_in_f64_and_across_zero() {
        let next = |x: f64, k: u64| f64::from_bits(x.to_bits() + k);
        assert_eq!(ulp_distance(next(1.0, 5), 1.0, DType::F64), 5);
        assert_eq!(ulp_distance(1.0, next(1.0, 5), DType::F64), 5);
        assert_eq!(ulp_distance(-next(2.0, 7), -2.0, DType::F64), 7);
        assert_eq!(ulp_distance(-0.0, 0.0, DType::F64), 0);
        let tiny = f64::from_bits(3);
        assert_eq!(ulp_distance(tiny, -tiny, DType::F64), 6);
        // The widest finite span still fits 64 bits: 2 (2^63 - 2^52 - 1).
        assert_eq!(
            ulp_distance(f64::MAX, -f64::MAX, DType::F64),
            0xFFDF_FFFF_FFFF_FFFE
        );
        assert_eq!(ulp_distance(f64::NAN, f64::NAN, DType::F64), 0);
        assert_eq!(ulp_distance(f64::NAN, 1.0, DType::F32), u64::MAX);
        assert_eq!(ulp_distance(1.0, f64::NAN, DType::F64), u64::MAX);
        let f = |x: f32| x as f64;
        assert_eq!(
            ulp_distance(
                f(-1.0),
                f(-f32::from_bits(1.0f32.to_bits() + 4)),
                DType::F32
            ),
            4
        );
    }

    #[test]
    fn norm_wise_error_and_its_zero_cases() {
        let r = compare_tensor(
            "x",
            &f64t(&[2], vec![3.0, 4.0]),
            &f64t(&[2], vec![3.0, 4.5]),
            TOL,
        );
        assert_eq!(r.norm_rel_error, 0.1);
        let zeros = f64t(&[2], vec![0.0, 0.0]);
        let r = compare_tensor("x", &zeros, &zeros, TOL);
        assert_eq!((r.norm_rel_error, r.status), (0.0, Status::Pass));
        let r = compare_tensor("x", &zeros, &f64t(&[2], vec![0.0, 1e-300]), TOL);
        assert_eq!(
            r.norm_rel_error,
            f64::INFINITY,
            "a difference of 1e-300 is not none"
        );
        assert_eq!((r.max_rel_error, r.status), (f64::INFINITY, Status::Fail));
        // Squares that would overflow (and below, underflow): the ratio is
        // still 0.1, up to the few roundings of two squares, a sum and a
        // square root (an ulp of 0.1 is 1.4e-17; 1e-15 leaves a wide margin
        // while an unscaled sum would give NaN or 0).
        let r = compare_tensor(
            "x",
            &f64t(&[2], vec![3e200, 4e200]),
            &f64t(&[2], vec![3e200, 4.5e200]),
            TOL,
        );
        assert!(
            (r.norm_rel_error - 0.1).abs() < 1e-15,
            "{}",
            r.norm_rel_error
        );
        let r = compare_tensor(
            "x",
            &f64t(&[2], vec![3e-200, 4e-200]),
            &f64t(&[2], vec![3e-200, 4.5e-200]),
            TOL,
        );
        assert!(
            (r.norm_rel_error - 0.1).abs() < 1e-15,
            "{}",
            r.norm_rel_error
        );
    }

    #[test]
    fn the_scaled_floor_ignores_infinite_expected_values() {
        // max|e| over finite values is 1, so stol = 1 forgives 1, not 2;
        // equal infinities pass.
        let e = f64t(&[2], vec![f64::INFINITY, 1.0]);
        let tol = Tolerance {
            rtol: 0.0,
            atol: 0.0,
            stol: 1.0,
        };
        let near = compare_tensor("x", &e, &f64t(&[2], vec![f64::INFINITY, 1.9]), tol);
        assert_eq!(near.status, Status::Pass);
        let far = compare_tensor("x", &e, &f64t(&[2], vec![f64::INFINITY, 3.0]), tol);
        assert_eq!((far.status, far.failures), (Status::Fail, 1));
        assert_eq!((far.worst_index.clone(), far.worst_actual), (vec![1], 3.0));
        // Equal infinities add nothing to the norm-wise error (inf - inf is NaN).
        assert_eq!(near.norm_rel_error, 0.0);
        let other_inf = compare_tensor("x", &e, &f64t(&[2], vec![f64::NEG_INFINITY, 1.0]), tol);
        assert_eq!(other_inf.status, Status::Fail);
    }

    #[test]
    fn a_negative_or_nan_tolerance_fails_every_tensor() {
        let e = f64t(&[2], vec![1.0, 2.0]);
        let a = f64t(&[2], vec![5.0, 2.0]);
        for (bad, what) in [
            (Tolerance { rtol: -1.0, ..TOL }, "rtol -1"),
            (
                Tolerance {
                    atol: f64::NAN,
                    ..TOL
                },
                "atol NaN",
            ),
            (
                Tolerance {
                    stol: f64::INFINITY,
                    ..TOL
                },
                "stol inf",
            ),
        ] {
            let r = compare_tensor("x", &e, &e, bad);
            assert_eq!(r.status, Status::Fail);
            assert_eq!(r.detail, format!("{what} is not finite and >= 0"));
            assert!(
                !compare(
                    &file(vec![("loss", e.clone())]),
                    &file(vec![("loss", a.clone())]),
                    bad,
                    false
                )
                .passed
            );
        }
        let edge = Tolerance {
            rtol: 0.0,
            atol: 0.0,
            stol: 0.0,
        };
        assert_eq!(edge.invalid(), None);
        assert_eq!(compare_tensor("x", &e, &e, edge).status, Status::Pass);
    }

    #[test]
    fn the_bound_is_inclusive_and_the_worst_is_reported_when_all_pass() {
        let tol = Tolerance {
            rtol: 0.0,
            atol: 0.5,
            stol: 0.0,
        };
        // |a - e| = atol exactly passes; the worst element is the one
        // nearest its bound even when every element passes; ties go to the
        // first.
        let e = f64t(&[4], vec![1.0, 1.0, 1.0, 1.0]);
        let r = compare_tensor("x", &e, &f64t(&[4], vec![1.25, 1.5, 0.5, 1.0]), tol);
        assert_eq!((r.status, r.failures), (Status::Pass, 0));
        assert_eq!((r.worst_index.clone(), r.worst_actual), (vec![1], 1.5));
        let r = compare_tensor("x", &e, &f64t(&[4], vec![1.0, 1.25, 1.0, 1.0]), tol);
        assert_eq!(r.worst_index, vec![1]);
    }

    #[test]
    fn the_norm_wise_error_scales_by_powers_of_two_only() {
        // In the normal range, the same bits as the unscaled sums.
        let (ev, av) = (vec![0.3, -1.7, 2.9], vec![0.31, -1.69, 2.95]);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (e, a) in ev.iter().zip(&av) {
            num += (a - e) * (a - e);
            den += e * e;
        }
        let r = compare_tensor("x", &f64t(&[3], ev), &f64t(&[3], av), TOL);
        assert_eq!(r.norm_rel_error, (num / den).sqrt());
        // Subnormal values: 2^-1074 against 3 * 2^-1074.
        let tiny = f64::from_bits(1);
        let r = compare_tensor(
            "x",
            &f64t(&[1], vec![tiny]),
            &f64t(&[1], vec![3.0 * tiny]),
            TOL,
        );
        assert_eq!(r.norm_rel_error, 2.0);
    }

    #[test]
    fn empty_tensors_compare_equal() {
        let empty = f64t(&[2, 0], vec![]);
        let r = compare_tensor("x", &empty, &empty, TOL);
        assert_eq!(r.status, Status::Pass);
        assert!(r.worst_index.is_empty() && r.worst_expected.is_nan());
        assert_eq!(
            (r.norm_rel_error, r.max_abs_error, r.failures),
            (0.0, 0.0, 0)
        );
    }

    #[test]
    fn nan_only_matches_nan() {
        let e = f64t(&[2], vec![f64::NAN, 1.0]);
        let a = f64t(&[2], vec![f64::NAN, f64::NAN]);
        let r = compare_tensor("x", &e, &a, TOL);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(r.worst_index, vec![1]);
        // Matching NaNs are left out of the norms: the rest gives the ratio
        // (it read inf before, NaN poisoning both sums).
        let e = f64t(&[3], vec![f64::NAN, 3.0, 4.0]);
        let r = compare_tensor("x", &e, &e, TOL);
        assert_eq!((r.norm_rel_error, r.status), (0.0, Status::Pass));
        let a = f64t(&[3], vec![f64::NAN, 3.0, 4.5]);
        assert_eq!(compare_tensor("x", &e, &a, TOL).norm_rel_error, 0.1);
        // A NaN on one side only: not a finite error.
        let one = compare_tensor("x", &f64t(&[3], vec![1.0, 3.0, 4.0]), &a, TOL);
        assert!(one.norm_rel_error.is_nan(), "{}", one.norm_rel_error);
        let other = compare_tensor("x", &a, &f64t(&[3], vec![1.0, 3.0, 4.5]), TOL);
        assert_eq!(other.norm_rel_error, f64::INFINITY);
    }

    #[test]
    fn files_with_no_tensor_in_common_do_not_pass() {
        let e = file(vec![("p0.student", f64t(&[1], vec![1.0]))]);
        let a = file(vec![("p1.student", f64t(&[1], vec![1.0]))]);
        // The allowed extra passes, but nothing was compared.
        let r = compare(&e, &a, TOL, true);
        assert_eq!(r.tensors.len(), 1);
        assert_eq!(r.tensors[0].status, Status::Pass);
        assert_eq!(r.compared(), 0);
        assert!(!r.passed);
        let text = table(&r, "E", "A");
        assert!(
            text.ends_with("FAIL: no tensor is in both files, nothing compared\n"),
            "{text}"
        );
        // One tensor in common is enough, the extra allowed.
        let both = file(vec![
            ("p0.student", f64t(&[1], vec![1.0])),
            ("p1.student", f64t(&[1], vec![1.0])),
        ]);
        let r = compare(&e, &both, TOL, true);
        assert_eq!(r.compared(), 1);
        assert!(r.passed);
        assert!(!compare(&e, &both, TOL, false).passed);
    }

    #[test]
    fn missing_outputs_extra_tensors_and_shape_mismatches_fail() {
        let expected = file(vec![
            ("loss", f64t(&[], vec![1.0])),
            ("grad.p0.student", f64t(&[2], vec![1.0, 2.0])),
            ("p0.student", f64t(&[2], vec![0.0, 0.0])),
        ]);
        let actual = file(vec![
            ("loss", f64t(&[], vec![1.0])),
            ("grad.p0.studnet", f64t(&[2], vec![1.0, 2.0])),
        ]);
        let r = compare(&expected, &actual, TOL, false);
        assert!(!r.passed);
        let status = |n: &str| r.tensors.iter().find(|t| t.name == n).unwrap().status;
        assert_eq!(status("loss"), Status::Pass);
        assert_eq!(status("grad.p0.student"), Status::Missing);
        assert_eq!(status("grad.p0.studnet"), Status::Extra);
        // The input tensor is not required of an implementation.
        assert!(r.tensors.iter().all(|t| t.name != "p0.student"));
        let wrong = file(vec![("loss", f64t(&[1], vec![1.0]))]);
        let r2 = compare(
            &file(vec![("loss", f64t(&[], vec![1.0]))]),
            &wrong,
            TOL,
            false,
        );
        assert_eq!(r2.tensors[0].status, Status::ShapeMismatch);
        assert!(!r2.passed);
    }

    #[test]
    fn required_names() {
        assert!(is_required_output("loss"));
        assert!(is_required_output("p3.loss"));
        assert!(is_required_output("grad.p0.gen_s.0.weight"));
        assert!(!is_required_output("p0.attn_s"));
        assert!(!is_required_output("p0.student"));
    }
}
