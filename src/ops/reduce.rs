//! Sums and means over chosen axes.
//!
//! `y = sum_{axes} x`: `dx = broadcast(g)` back to `x`'s shape; a mean
//! divides by the number of summed elements, and so does its derivative.

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::shape::{check_axes, reduced_shape};
use crate::tensor::Float;

impl<T: Float> Var<T> {
    /// Sum over `axes` (an empty list sums nothing); `keepdim` keeps them as size 1.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Var<T>> {
        check_axes("sum", axes, self.value().rank())?;
        let x_shape = self.shape().to_vec();
        let kept = reduced_shape(&x_shape, axes);
        let out_shape: Vec<usize> = if keepdim {
            kept.clone()
        } else {
            x_shape
                .iter()
                .enumerate()
                .filter(|(k, _)| !axes.contains(k))
                .map(|(_, &d)| d)
                .collect()
        };
        let y = if axes.is_empty() {
            self.value().clone()
        } else {
            self.backend().sum_axes(self.value(), axes)?
        }
        .reshape(&out_shape)?;
        self.tape().record(&[self], y, move |be, g, _| {
            let g = g.reshape(&kept)?;
            Ok(vec![Some(be.broadcast_to(&g, &x_shape)?)])
        })
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Var<T>> {
        check_axes("mean", axes, self.value().rank())?;
        let count: usize = axes.iter().map(|&a| self.shape()[a]).product();
        if count == 0 {
            return Err(Error::ZeroSized {
                what: "mean over an empty axis".into(),
                shape: self.shape().to_vec(),
            });
        }
        self.sum(axes, keepdim)?.scale(1.0 / count as f64)
    }

    /// Sum of every element, as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Var<T>> {
        let axes: Vec<usize> = (0..self.value().rank()).collect();
        self.sum(&axes, false)
    }
}
