//! Softmax along one axis, computed stably (the maximum is subtracted first).
//!
//! `y_k = exp(x_k - max) / sum_j exp(x_j - max)`;
//! `dx_k = y_k (g_k - sum_j g_j y_j)`.

use crate::autograd::Var;
use crate::error::Result;
use crate::shape::check_axes;
use crate::tensor::Float;

impl<T: Float> Var<T> {
    /// Softmax along `axis`, the maximum subtracted first.
    pub fn softmax(&self, axis: usize) -> Result<Var<T>> {
        check_axes("softmax", &[axis], self.value().rank())?;
        self.value().check_nonempty("softmax input")?;
        let y = self.backend().softmax(self.value(), axis)?;
        let y_val = y.clone();
        self.tape().record(&[self], y, move |be, g, _| {
            let g = &g;
            Ok(vec![Some(be.softmax_backward(&y_val, g, axis)?)])
        })
    }
}
