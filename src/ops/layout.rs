//! Layout ops: reshape (no copy) and narrow (a slice along one axis).
//!
//! reshape: `dx = g` viewed in `x`'s shape. narrow: `dx` is zero except the
//! slice, which receives `g`.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::tensor::Float;

impl<T: Float> Var<T> {
    /// The same elements under another shape (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Var<T>> {
        let y = self.value().reshape(shape)?;
        let x_shape = self.shape().to_vec();
        self.tape().record(&[self], y, move |_, g, _| {
            Ok(vec![Some(g.reshape(&x_shape)?)])
        })
    }

    /// Elements `start..start + len` along `axis`.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Var<T>> {
        let shape = self.shape().to_vec();
        if axis >= shape.len() {
            return Err(Error::arg(
                "narrow",
                format!("axis {axis} out of range for shape {shape:?}"),
            ));
        }
        if len == 0 {
            return Err(Error::arg(
                "narrow",
                format!("length 0 along axis {axis}: a slice keeps at least one element"),
            ));
        }
        if start.checked_add(len).is_none_or(|end| end > shape[axis]) {
            return Err(Error::arg(
                "narrow",
                format!(
                    "slice {start}..{} out of range for axis {axis} of {shape:?}",
                    start.saturating_add(len)
                ),
            ));
        }
        let y = self.backend().narrow(self.value(), axis, start, len)?;
        self.tape().record(&[self], y, move |be, g, _| {
            let g = &g;
            Ok(vec![Some(be.narrow_backward(g, &shape, axis, start)?)])
        })
    }

    /// Element `i` of a 1-d variable, as a rank-0 variable.
    pub fn index1(&self, i: usize) -> Result<Var<T>> {
        if self.value().rank() != 1 {
            return Err(Error::shape(
                "index1",
                format!("expected a 1-d variable, got {:?}", self.shape()),
            ));
        }
        self.narrow(0, i, 1)?.reshape(&[])
    }
}
