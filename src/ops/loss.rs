//! Squared-error sums, the core of every loss here.
//!
//! `L = sum((a - b)^2)`: `da = 2 g (a - b)`, `db = -da`.
//!
//! `L = sum((wa a + wb b - t)^2)` (DMKD's fusion and loss in one op, so the
//! fused feature is never stored): with `r = wa a + wb b - t`,
//! `da = 2 g wa r`, `db = 2 g wb r`, `dwa = 2 g <r, a>`, `dwb = 2 g <r, b>`,
//! `dt = -2 g r`.

use crate::autograd::Var;
use crate::backend::{Binary, Unary};
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
        let y =
            self.backend()
                .weighted_pair_sq_err(self.value(), b.value(), wa_v, wb_v, t.value())?;
        let (av, bv, tv) = (self.value().clone(), b.value().clone(), t.value().clone());
        let (wa_shape, wb_shape) = (wa.shape().to_vec(), wb.shape().to_vec());
        self.tape()
            .record(&[self, b, wa, wb, t], y, move |be, g, needs| {
                let g = g.item()?;
                let (da, db, dwa, dwb) =
                    be.weighted_pair_sq_err_backward(&av, &bv, wa_v, wb_v, &tv, g)?;
                let dt = if needs[4] {
                    // dt = -2 g r = -(da / wa) when wa != 0; recompute r to stay exact.
                    let fused = be.binary(
                        Binary::Add,
                        &be.unary(Unary::Scale(wa_v.as_f64()), &av)?,
                        &be.unary(Unary::Scale(wb_v.as_f64()), &bv)?,
                        av.shape(),
                    )?;
                    let r = be.binary(Binary::Sub, &fused, &tv, av.shape())?;
                    Some(be.unary(Unary::Scale(-2.0 * g.as_f64()), &r)?)
                } else {
                    None
                };
                Ok(vec![
                    needs[0].then_some(da),
                    needs[1].then_some(db),
                    Some(Tensor::from_vec(&wa_shape, vec![dwa])?),
                    Some(Tensor::from_vec(&wb_shape, vec![dwb])?),
                    dt,
                ])
            })
    }
}
