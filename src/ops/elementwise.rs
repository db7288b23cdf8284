//! Element-wise ops: unary functions, broadcasting arithmetic, the masking multiply.
//!
//! Derivatives (`g` is the output gradient):
//! - unary `y = f(x)`: `dx = g * f'(x)`; relu' = `[x > 0]`, abs' = sign(x)
//!   (0 at 0), exp' = y, ln' = 1/x, sqrt' = 1/(2y), recip' = -y^2, square' = 2x.
//! - `a + b`: `(g, g)`; `a - b`: `(g, -g)`; `a * b`: `(g b, g a)`;
//!   `a / b`: `(g / b, -(g / b) * y)`; each summed back to its operand's
//!   shape over the broadcast dims.
//! - `x * m` with a constant mask: `dx = g * m`.

use crate::autograd::Var;
use crate::backend::{Backend, Binary, InputMask, Unary};
use crate::error::{Error, Result};
use crate::shape::{broadcast_shapes, broadcasts_to};
use crate::tensor::{Float, Tensor};

/// Sum `g` over the dims along which a tensor of `shape` was broadcast, so
/// that the result has `shape` (the adjoint of broadcasting).
pub fn sum_to_shape<T: Float>(
    be: &dyn Backend<T>,
    g: &Tensor<T>,
    shape: &[usize],
) -> Result<Tensor<T>> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    if !broadcasts_to(shape, g.shape()) {
        return Err(Error::shape(
            "sum_to_shape",
            format!("{shape:?} does not broadcast to {:?}", g.shape()),
        ));
    }
    let off = g.rank() - shape.len();
    let axes: Vec<usize> = (0..g.rank())
        .filter(|&k| k < off || (shape[k - off] == 1 && g.shape()[k] != 1))
        .collect();
    let s = if axes.is_empty() {
        g.clone()
    } else {
        be.sum_axes(g, &axes)?
    };
    s.reshape(shape)
}

impl<T: Float> Var<T> {
    /// Apply an element-wise function.
    pub fn unary(&self, op: Unary) -> Result<Var<T>> {
        let y = self.backend().unary(op, self.value())?;
        let x_val = self.value().clone();
        let y_val = y.clone();
        self.tape().record(&[self], y, move |be, g, _| {
            let g = &g;
            Ok(vec![Some(be.unary_backward(op, &x_val, &y_val, g)?)])
        })
    }

    /// `max(x, 0)`; derivative 0 at 0.
    pub fn relu(&self) -> Result<Var<T>> {
        self.unary(Unary::Relu)
    }
    /// `|x|`; derivative 0 at 0.
    pub fn abs(&self) -> Result<Var<T>> {
        self.unary(Unary::Abs)
    }
    /// `-x`.
    pub fn neg(&self) -> Result<Var<T>> {
        self.unary(Unary::Neg)
    }
    /// `e^x`.
    pub fn exp(&self) -> Result<Var<T>> {
        self.unary(Unary::Exp)
    }
    /// Natural logarithm.
    pub fn ln(&self) -> Result<Var<T>> {
        self.unary(Unary::Ln)
    }
    /// Square root.
    pub fn sqrt(&self) -> Result<Var<T>> {
        self.unary(Unary::Sqrt)
    }
    /// `1 / x`.
    pub fn recip(&self) -> Result<Var<T>> {
        self.unary(Unary::Recip)
    }
    /// `x^2`.
    pub fn square(&self) -> Result<Var<T>> {
        self.unary(Unary::Square)
    }
    /// `c * x`
    pub fn scale(&self, c: f64) -> Result<Var<T>> {
        self.unary(Unary::Scale(c))
    }
    /// `x + c`
    pub fn add_scalar(&self, c: f64) -> Result<Var<T>> {
        self.unary(Unary::AddScalar(c))
    }

    /// `self op other`, NumPy broadcasting.
    pub fn binary(&self, op: Binary, other: &Var<T>) -> Result<Var<T>> {
        let name = match op {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        };
        let out_shape = broadcast_shapes(name, self.shape(), other.shape())?;
        let y = self
            .backend()
            .binary(op, self.value(), other.value(), &out_shape)?;
        // Keep only what the derivative reads: a sum or difference needs its
        // operands' shapes, a product or quotient the other operand (and a
        // quotient its output), so a sum of two activations holds neither.
        let (a_shape, b_shape) = (self.shape().to_vec(), other.shape().to_vec());
        let a = (op == Binary::Mul).then(|| self.value().clone());
        let b = matches!(op, Binary::Mul | Binary::Div).then(|| other.value().clone());
        let y_val = (op == Binary::Div).then(|| y.clone());
        self.tape().record(&[self, other], y, move |be, g, needs| {
            let g = &g;
            // Each operand's gradient at the output's shape, computed only
            // when that operand needs one.
            fn kept<T: Float>(t: &Option<Tensor<T>>) -> &Tensor<T> {
                t.as_ref().expect("the op kept this operand")
            }
            let ga = if needs[0] {
                Some(match op {
                    Binary::Add | Binary::Sub => g.clone(),
                    Binary::Mul => be.binary(Binary::Mul, g, kept(&b), g.shape())?,
                    Binary::Div => be.binary(Binary::Div, g, kept(&b), g.shape())?,
                })
            } else {
                None
            };
            let gb = if needs[1] {
                Some(match op {
                    Binary::Add => g.clone(),
                    Binary::Sub => be.unary(Unary::Neg, g)?,
                    Binary::Mul => be.binary(Binary::Mul, g, kept(&a), g.shape())?,
                    Binary::Div => {
                        // -(g / b) * y with y = a / b.
                        let g_over_b = be.binary(Binary::Div, g, kept(&b), g.shape())?;
                        let y = y_val.as_ref().expect("div keeps its output");
                        let t = be.binary(Binary::Mul, &g_over_b, y, g.shape())?;
                        be.unary(Unary::Neg, &t)?
                    }
                })
            } else {
                None
            };
            // Sum back over the broadcast dims to each operand's shape.
            let ga = ga.map(|t| sum_to_shape(be, &t, &a_shape)).transpose()?;
            let gb = gb.map(|t| sum_to_shape(be, &t, &b_shape)).transpose()?;
            Ok(vec![ga, gb])
        })
    }

    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Var<T>) -> Result<Var<T>> {
        self.binary(Binary::Add, other)
    }
    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Var<T>) -> Result<Var<T>> {
        self.binary(Binary::Sub, other)
    }
    /// `self * other`, broadcasting.
    pub fn mul(&self, other: &Var<T>) -> Result<Var<T>> {
        self.binary(Binary::Mul, other)
    }
    /// `self / other`, broadcasting.
    pub fn div(&self, other: &Var<T>) -> Result<Var<T>> {
        self.binary(Binary::Div, other)
    }

    /// The masking multiply: `x * m` with a constant mask broadcast over
    /// channels (`Spatial`, `[N,H,W]`) or over positions (`Channel`, `[N,C]`).
    pub fn mask_mul(&self, mask: &InputMask<T>) -> Result<Var<T>> {
        let dims = self.value().dims4("mask_mul")?;
        mask.check("mask_mul", dims)?;
        let y = self.backend().mask_mul(self.value(), mask)?;
        let m = mask.clone();
        self.tape().record(&[self], y, move |be, g, _| {
            let g = &g;
            Ok(vec![Some(be.mask_mul(g, &m)?)])
        })
    }
}
