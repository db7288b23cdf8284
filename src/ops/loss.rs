//! Squared-error sums, the core of every loss here.
//!
//! `L = sum((a - b)^2)`: `da = 2 g (a - b)`, `db = -da`.
//!
//! `L = sum((wa a + wb b - t)^2)` (DMKD's fusion and loss in one op, so the
//! fused feature is never stored): with `r = wa a + wb b - t`,
//! `da = 2 g wa r`, `db = 2 g wb r`, `dwa = 2 g <r, a>`, `dwb = 2 g <r, b>`,
//! `dt = -2 g r`. The forward pass computes `r` and both dots in the same
//! pass as the loss and keeps only `r`: one tensor instead of `a`, `b` (and
//! `t`), which is what lets the generation blocks' outputs go before the
//! backward pass starts.

use crate::autograd::Var;
use crate::backend::Unary;
use crate::error::{Error, Result};
use crate::tensor::Float;
use crate::tensor::Tensor;

impl<T: Float> Var<T> {
    /// `sum((self - other)^2)` as a rank-0 variable; shapes must match exactly.
    pub fn sq_err_sum(&self, other: &Var<T>) -> Result<Var<T>> {
        if self.shape() != other.shape() {
            return Err(Error::shape(
                "sq_err_sum",
                format!("{:?} vs {:?}", self.shape(), other.shape()),
            ));
        }
        let y = self.backend().sq_err_sum(self.value(), other.value())?;
        let (a, b) = (self.value().clone(), other.value().clone());
        self.tape().record(&[self, other], y, move |be, g, needs| {
            let g = g.item()?;
            let da = be.sq_err_backward(&a, &b, g)?;
            let db = if needs[1] {
                Some(be.unary(Unary::Neg, &da)?)
            } else {
                None
            };
            Ok(vec![needs[0].then_some(da), db])
        })
    }
}

impl<T: Float> Var<T> {
    /// `sum((wa * self + wb * b - t)^2)` with scalar (rank-0) weights `wa`, `wb`.
    pub fn weighted_pair_sq_err(
        &self,
        b: &Var<T>,
        wa: &Var<T>,
        wb: &Var<T>,
        t: &Var<T>,
    ) -> Result<Var<T>> {
        self.clone().weighted_pair_sq_err_owned(b, wa, wb, t)
    }

    /// [`Var::weighted_pair_sq_err`], taking `self`: the residual the op
    /// keeps may be written into `self`'s buffer where nothing else holds
    /// it (`Backend::weighted_pair_residual_owned`), which saves one
    /// activation-sized buffer. The same values and gradients.
    pub fn weighted_pair_sq_err_owned(
        self,
        b: &Var<T>,
        wa: &Var<T>,
        wb: &Var<T>,
        t: &Var<T>,
    ) -> Result<Var<T>> {
        if self.shape() != b.shape() || self.shape() != t.shape() {
            return Err(Error::shape(
                "weighted_pair_sq_err",
                format!(
                    "{:?}, {:?} and target {:?}",
                    self.shape(),
                    b.shape(),
                    t.shape()
                ),
            ));
        }
        if wa.value().numel() != 1 || wb.value().numel() != 1 {
            return Err(Error::shape(
                "weighted_pair_sq_err",
                format!(
                    "weights must be scalars, got {:?} and {:?}",
                    wa.shape(),
                    wb.shape()
                ),
            ));
        }
        let (wa_v, wb_v) = (wa.value().item()?, wb.value().item()?);
        let mut this = self;
        let a = this.take_value();
        let pair =
            this.backend()
                .weighted_pair_residual_owned(a, b.value(), wa_v, wb_v, t.value())?;
        let this = &this;
        let y = Tensor::scalar(pair.sq_sum);
        // The backward pass needs the residual only when a tensor operand
        // wants a gradient; the weights' gradients need only the two dots.
        // Neither `a` nor `b` is kept: the generation blocks' outputs are
        // freed when the forward pass drops them.
        let needs_r = this.requires_grad() || b.requires_grad() || t.requires_grad();
        let r = needs_r.then_some(pair.residual);
        let (dot_a, dot_b) = (pair.dot_a, pair.dot_b);
        let (wa_shape, wb_shape) = (wa.shape().to_vec(), wb.shape().to_vec());
        this.tape()
            .record(&[this, b, wa, wb, t], y, move |be, g, needs| {
                let g = g.item()?;
                let two_g = (g + g).as_f64();
                // da, db and dt are r scaled; the last one wanted is
                // written into r's own buffer (the backend may, as r is
                // not needed after it), the others are new tensors.
                let coeffs = [
                    (0, two_g * wa_v.as_f64()),
                    (1, two_g * wb_v.as_f64()),
                    (4, -two_g),
                ];
                let wanted: Vec<(usize, f64)> =
                    coeffs.into_iter().filter(|&(i, _)| needs[i]).collect();
                let mut scaled: [Option<Tensor<T>>; 5] = Default::default();
                if let Some((&(last, c_last), rest)) = wanted.split_last() {
                    let r = r.ok_or_else(|| {
                        Error::Autograd("weighted_pair_sq_err: residual not kept".into())
                    })?;
                    for &(i, c) in rest {
                        scaled[i] = Some(be.unary(Unary::Scale(c), &r)?);
                    }
                    scaled[last] = Some(be.unary_owned(Unary::Scale(c_last), r)?);
                }
                let [da, db, _, _, dt] = scaled;
                let two_g = T::from_f64(two_g);
                Ok(vec![
                    da,
                    db,
                    Some(Tensor::from_vec(&wa_shape, vec![two_g * dot_a])?),
                    Some(Tensor::from_vec(&wb_shape, vec![two_g * dot_b])?),
                    dt,
                ])
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{each_subset_of_leaves, values};
    use crate::tensor::Tensor;

    #[test]
    fn sq_err_sum_gradients_for_every_subset_of_leaves() {
        each_subset_of_leaves(&[values(&[2, 3], 0), values(&[2, 3], 1)], |v| {
            v[0].sq_err_sum(&v[1])
        });
    }

    #[test]
    fn weighted_pair_sq_err_gradients_for_every_subset_of_leaves() {
        let (wa, wb) = (Tensor::scalar(0.75), Tensor::scalar(-1.25));
        let s = [2, 4];
        let inputs = [values(&s, 0), values(&s, 1), wa, wb, values(&s, 2)];
        each_subset_of_leaves(&inputs, |v| {
            v[0].weighted_pair_sq_err(&v[1], &v[2], &v[3], &v[4])
        });
    }

    /// The op taking its first operand (whose buffer the CPU backend then
    /// reuses for the residual, `a = x + x` having no other handle) gives
    /// the borrowing op's loss and gradients bit for bit.
    #[test]
    fn weighted_pair_sq_err_owned_is_the_borrowing_op() {
        use crate::autograd::Tape;
        use crate::backend::CpuBackend;
        use std::sync::Arc;
        let s = [2, 3, 40];
        let run = |owned: bool| {
            let tape = Tape::new(Arc::new(CpuBackend::new(crate::ConvAlgo::Direct)));
            let [x, b, t] = [0, 1, 2].map(|i| tape.leaf(values(&s, i)));
            let (wa, wb) = (
                tape.leaf(Tensor::scalar(0.75)),
                tape.leaf(Tensor::scalar(-1.25)),
            );
            let a = x.add(&x).unwrap();
            let loss = if owned {
                a.weighted_pair_sq_err_owned(&b, &wa, &wb, &t)
            } else {
                a.weighted_pair_sq_err(&b, &wa, &wb, &t)
            }
            .unwrap();
            let grads = loss.backward().unwrap();
            let mut out = vec![loss.value().as_slice().to_vec()];
            out.extend([&x, &b, &wa, &wb, &t].map(|v| grads.get(v).unwrap().as_slice().to_vec()));
            out
        };
        assert_eq!(run(true), run(false));
    }
}
