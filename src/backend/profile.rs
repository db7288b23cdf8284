//! A backend that times another: every kernel call is forwarded unchanged
//! and its wall time added to a row keyed by the kernel and its shape, so a
//! whole-loss run shows where the time goes (`dmkd bench --profile`).
//!
//! It changes no result (same calls, same operands, same order); the cost
//! is two clock reads and a short lock per call, nothing per element.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::{Backend, BackendRef, Binary, ConvArgs, InputMask, PairResidual, Unary};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// One row of a profile: a kernel (with its shape) and its accumulated time.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ProfileRow {
    /// The kernel and what distinguishes its calls, e.g.
    /// `conv.forward 3x3 256->256 2x100x168 mask=spatial`.
    pub kernel: String,
    /// Number of calls.
    pub calls: u64,
    /// Wall time summed over the calls.
    pub seconds: f64,
}

/// Wraps a backend and times each of its calls.
pub struct Profiled<T: Float> {
    inner: BackendRef<T>,
    rows: Mutex<BTreeMap<String, (u64, f64)>>,
}

impl<T: Float> Profiled<T> {
    /// Time the calls made to `inner`.
    pub fn new(inner: BackendRef<T>) -> Self {
        Profiled {
            inner,
            rows: Mutex::new(BTreeMap::new()),
        }
    }

    /// The rows so far, slowest first.
    pub fn rows(&self) -> Vec<ProfileRow> {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ProfileRow> = rows
            .iter()
            .map(|(k, &(calls, seconds))| ProfileRow {
                kernel: k.clone(),
                calls,
                seconds,
            })
            .collect();
        out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        out
    }

    /// Forget every row.
    pub fn reset(&self) {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn time<R>(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        let dt = t0.elapsed().as_secs_f64();
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let e = rows.entry(key()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        r
    }
}

fn shape(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

fn conv_key<T: Float>(pass: &str, args: &ConvArgs<T>) -> String {
    let g = &args.geom;
    let mask = match &args.mask {
        None => "",
        Some(InputMask::Spatial(_)) => " mask=spatial",
        Some(InputMask::Channel(_)) => " mask=channel",
    };
    format!(
        "conv.{pass} {}x{} {}->{} {}x{}x{}{mask}",
        g.kh, g.kw, g.c_in, g.c_out, g.n, g.h, g.w
    )
}

impl<T: Float> Backend<T> for Profiled<T> {
    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }

    fn conv2d(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || conv_key("forward", args),
            || self.inner.conv2d(x, w, b, args),
        )
    }

    fn conv2d_add(
        &self,
        base: Tensor<T>,
        x: &Tensor<T>,
        w: &Tensor<T>,
        b: Option<&Tensor<T>>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || conv_key("forward_add", args),
            || self.inner.conv2d_add(base, x, w, b, args),
        )
    }

    fn conv2d_backward_input(
        &self,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || conv_key("input_grad", args),
            || self.inner.conv2d_backward_input(dy, w, args),
        )
    }

    fn conv2d_backward_weight(
        &self,
        dy: &Tensor<T>,
        x: &Tensor<T>,
        args: &ConvArgs<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || conv_key("weight_grad", args),
            || self.inner.conv2d_backward_weight(dy, x, args),
        )
    }

    fn conv2d_backward_bias(&self, dy: &Tensor<T>) -> Result<Tensor<T>> {
        self.time(
            || format!("conv.bias_grad {}", shape(dy.shape())),
            || self.inner.conv2d_backward_bias(dy),
        )
    }

    fn unary(&self, op: Unary, x: &Tensor<T>) -> Result<Tensor<T>> {
        self.time(
            || format!("unary.{op:?} {}", shape(x.shape())),
            || self.inner.unary(op, x),
        )
    }

    fn unary_backward(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: &Tensor<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || format!("unary_backward.{op:?} {}", shape(x.shape())),
            || self.inner.unary_backward(op, x, y, dy),
        )
    }

    fn binary(
        &self,
        op: Binary,
        a: &Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        self.time(
            || {
                format!(
                    "binary.{op:?} {} {} -> {}",
                    shape(a.shape()),
                    shape(b.shape()),
                    shape(out_shape)
                )
            },
            || self.inner.binary(op, a, b, out_shape),
        )
    }

    fn unary_owned(&self, op: Unary, x: Tensor<T>) -> Result<Tensor<T>> {
        let label = format!("unary.{op:?} {}", shape(x.shape()));
        self.time(|| label, || self.inner.unary_owned(op, x))
    }

    fn unary_backward_owned(
        &self,
        op: Unary,
        x: &Tensor<T>,
        y: &Tensor<T>,
        dy: Tensor<T>,
    ) -> Result<Tensor<T>> {
        self.time(
            || format!("unary_backward.{op:?} {}", shape(x.shape())),
            || self.inner.unary_backward_owned(op, x, y, dy),
        )
    }

    fn binary_owned(
        &self,
        op: Binary,
        a: Tensor<T>,
        b: &Tensor<T>,
        out_shape: &[usize],
    ) -> Result<Tensor<T>> {
        let label = format!(
            "binary.{op:?} {} {} -> {}",
            shape(a.shape()),
            shape(b.shape()),
            shape(out_shape)
        );
        self.time(|| label, || self.inner.binary_owned(op, a, b, out_shape))
    }

    fn mask_mul(&self, x: &Tensor<T>, mask: &InputMask<T>) -> Result<Tensor<T>> {
        self.time(
            || format!("mask_mul {}", shape(x.shape())),
            || self.inner.mask_mul(x, mask),
        )
    }

    fn sum_axes(&self, x: &Tensor<T>, axes: &[usize]) -> Result<Tensor<T>> {
        self.time(
            || format!("sum_axes {} over {axes:?}", shape(x.shape())),
            || self.inner.sum_axes(x, axes),
        )
    }

    fn broadcast_to(&self, x: &Tensor<T>, to: &[usize]) -> Result<Tensor<T>> {
        self.time(
            || format!("broadcast_to {} -> {}", shape(x.shape()), shape(to)),
            || self.inner.broadcast_to(x, to),
        )
    }

    fn softmax(&self, x: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        self.time(
            || format!("softmax {} axis {axis}", shape(x.shape())),
            || self.inner.softmax(x, axis),
        )
    }

    fn softmax_backward(&self, y: &Tensor<T>, dy: &Tensor<T>, axis: usize) -> Result<Tensor<T>> {
        self.time(
            || format!("softmax_backward {} axis {axis}", shape(y.shape())),
            || self.inner.softmax_backward(y, dy, axis),
        )
    }

    fn narrow(&self, x: &Tensor<T>, axis: usize, start: usize, len: usize) -> Result<Tensor<T>> {
        self.time(
            || format!("narrow {}", shape(x.shape())),
            || self.inner.narrow(x, axis, start, len),
        )
    }

    fn narrow_backward(
        &self,
        dy: &Tensor<T>,
        to: &[usize],
        axis: usize,
        start: usize,
    ) -> Result<Tensor<T>> {
        self.time(
            || format!("narrow_backward {}", shape(to)),
            || self.inner.narrow_backward(dy, to, axis, start),
        )
    }

    fn sq_err_sum(&self, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
        self.time(
            || format!("sq_err_sum {}", shape(a.shape())),
            || self.inner.sq_err_sum(a, b),
        )
    }

    fn sq_err_backward(&self, a: &Tensor<T>, b: &Tensor<T>, g: T) -> Result<Tensor<T>> {
        self.time(
            || format!("sq_err_backward {}", shape(a.shape())),
            || self.inner.sq_err_backward(a, b, g),
        )
    }

    fn weighted_pair_residual(
        &self,
        a: &Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        self.time(
            || format!("weighted_pair_residual {}", shape(a.shape())),
            || self.inner.weighted_pair_residual(a, b, wa, wb, t),
        )
    }

    fn weighted_pair_residual_owned(
        &self,
        a: Tensor<T>,
        b: &Tensor<T>,
        wa: T,
        wb: T,
        t: &Tensor<T>,
    ) -> Result<PairResidual<T>> {
        let label = format!("weighted_pair_residual {}", shape(a.shape()));
        self.time(
            || label,
            || self.inner.weighted_pair_residual_owned(a, b, wa, wb, t),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ConvGeometry, ReferenceBackend};
    use std::sync::Arc;

    #[test]
    fn forwards_every_call_unchanged_and_counts_it() {
        let p = Profiled::<f64>::new(Arc::new(ReferenceBackend));
        let x = Tensor::from_vec(&[2, 3], vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0]).unwrap();
        let y = p.unary(Unary::Abs, &x).unwrap();
        assert_eq!(y.as_slice(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        p.unary(Unary::Abs, &x).unwrap();
        let s = p.sum_axes(&x, &[1]).unwrap();
        assert_eq!(s.as_slice(), &[2.0, -5.0]);
        let sm = p.softmax(&x, 1).unwrap();
        assert_eq!(
            sm.as_slice(),
            ReferenceBackend.softmax(&x, 1).unwrap().as_slice()
        );
        let rows = p.rows();
        let find = |k: &str| rows.iter().find(|r| r.kernel == k).unwrap().calls;
        assert_eq!(find("unary.Abs 2x3"), 2);
        assert_eq!(find("sum_axes 2x3 over [1]"), 1);
        assert_eq!(find("softmax 2x3 axis 1"), 1);
        assert_eq!(rows.len(), 3);
        assert!(rows.windows(2).all(|w| w[0].seconds >= w[1].seconds));
        // Every call's wall time is added (a clock read takes some
        // nanoseconds, so no row is at zero).
        assert!(rows.iter().all(|r| r.seconds > 0.0), "{rows:?}");
        assert!(p.name().starts_with("reference"));
        p.reset();
        assert!(p.rows().is_empty());
    }

    #[test]
    fn operands_given_up_are_passed_on_and_counted_as_the_borrowing_calls() {
        let p = Profiled::<f32>::new(Arc::new(crate::backend::CpuBackend::new(
            crate::ConvAlgo::Auto,
        )));
        let t = |v: Vec<f32>| Tensor::from_vec(&[2, 2], v).unwrap();
        let x = t(vec![1.0, -2.0, 3.0, -4.0]);
        // Each result lands in the operand's own buffer: the wrapped
        // backend got the operand itself, not a borrowed copy.
        let a = t(vec![1.0, -2.0, 3.0, -4.0]);
        let at = a.as_slice().as_ptr();
        let y = p.unary_owned(Unary::Neg, a).unwrap();
        assert_eq!(
            (y.as_slice().as_ptr(), y.as_slice()),
            (at, &[-1.0, 2.0, -3.0, 4.0][..])
        );
        let y = p.unary_backward_owned(Unary::Relu, &x, &x, y).unwrap();
        assert_eq!(
            (y.as_slice().as_ptr(), y.as_slice()),
            (at, &[-1.0, 0.0, -3.0, 0.0][..])
        );
        let y = p.binary_owned(Binary::Add, y, &x, &[2, 2]).unwrap();
        assert_eq!(
            (y.as_slice().as_ptr(), y.as_slice()),
            (at, &[0.0, -2.0, 0.0, -4.0][..])
        );
        // r = 0.5 y + 1 x - x.
        let pair = p.weighted_pair_residual_owned(y, &x, 0.5, 1.0, &x).unwrap();
        let r = &pair.residual;
        assert_eq!(
            (r.as_slice().as_ptr(), r.as_slice()),
            (at, &[0.0, -1.0, 0.0, -2.0][..])
        );
        // base + conv(x, 2), a 1 x 1 conv, in the base's buffer.
        let base = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let at = base.as_slice().as_ptr();
        let args = ConvArgs {
            geom: ConvGeometry::new(&[1, 1, 2, 2], &[1, 1, 1, 1], [1, 1], [0, 0]).unwrap(),
            mask: None,
            relu: false,
        };
        let (xs, two) = (
            x.reshape(&[1, 1, 2, 2]).unwrap(),
            Tensor::from_vec(&[1, 1, 1, 1], vec![2.0]).unwrap(),
        );
        let y = p.conv2d_add(base, &xs, &two, None, &args).unwrap();
        assert_eq!(
            (y.as_slice().as_ptr(), y.as_slice()),
            (at, &[3.0, -2.0, 9.0, -4.0][..])
        );
        let rows = p.rows();
        let find = |k: &str| rows.iter().find(|r| r.kernel == k).map(|r| r.calls);
        assert_eq!(find("conv.forward_add 1x1 1->1 1x2x2"), Some(1));
        assert_eq!(find("unary.Neg 2x2"), Some(1));
        assert_eq!(find("unary_backward.Relu 2x2"), Some(1));
        assert_eq!(find("binary.Add 2x2 2x2 -> 2x2"), Some(1));
        assert_eq!(find("weighted_pair_residual 2x2"), Some(1));
    }

    #[test]
    fn conv_rows_name_the_pass_geometry_and_mask() {
        let p = Profiled::<f64>::new(Arc::new(ReferenceBackend));
        let x = Tensor::<f64>::ones(&[2, 3, 5, 6]).unwrap();
        let w = Tensor::<f64>::ones(&[4, 3, 3, 3]).unwrap();
        let geom = ConvGeometry::new(x.shape(), w.shape(), [1, 1], [1, 1]).unwrap();
        let masks = [
            None,
            Some(InputMask::Spatial(Tensor::ones(&[2, 5, 6]).unwrap())),
            Some(InputMask::Channel(Tensor::ones(&[2, 3]).unwrap())),
        ];
        for mask in masks {
            let args = ConvArgs {
                geom,
                mask,
                relu: false,
            };
            let y = p.conv2d(&x, &w, None, &args).unwrap();
            assert_eq!(
                y.as_slice(),
                ReferenceBackend
                    .conv2d(&x, &w, None, &args)
                    .unwrap()
                    .as_slice()
            );
        }
        // The add's own row: the wrapped backend's whole `conv2d_add`.
        let base = Tensor::<f64>::ones(&[2, 4, 5, 6]).unwrap();
        let args = ConvArgs {
            geom,
            mask: None,
            relu: false,
        };
        let y = p.conv2d_add(base.clone(), &x, &w, None, &args).unwrap();
        let r = ReferenceBackend;
        let conv = r.conv2d(&x, &w, None, &args).unwrap();
        let want = r.binary(Binary::Add, &base, &conv, base.shape()).unwrap();
        assert_eq!(y.as_slice(), want.as_slice());
        let mut kernels: Vec<String> = p.rows().into_iter().map(|r| r.kernel).collect();
        kernels.sort();
        assert_eq!(
            kernels,
            [
                "conv.forward 3x3 3->4 2x5x6",
                "conv.forward 3x3 3->4 2x5x6 mask=channel",
                "conv.forward 3x3 3->4 2x5x6 mask=spatial",
                "conv.forward_add 3x3 3->4 2x5x6",
            ]
        );
    }
}
