//! Squared-error sum, the core of every loss here.
//!
//! `L = sum((a - b)^2)`: `da = 2 g (a - b)`, `db = -da`.

use crate::autograd::Var;
use crate::backend::Unary;
use crate::error::{Error, Result};
use crate::tensor::Float;

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
