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
        let a = (op == Binary::Mul).then(|| self.value().clone());
        self.record_binary(op, other, y, self.shape().to_vec(), a)
    }

    /// `self + other`, broadcasting, taking `self`: the sum is written into
    /// `self`'s buffer where nothing else holds it (a sum's derivative
    /// reads neither operand) and both operands have the output's shape
    /// (on a backend that writes in place: `Backend::binary_owned`), else
    /// into a new one.
    ///
    /// The same values and gradients as [`Var::add`]; what it saves is a
    /// fresh activation-sized buffer. (To add a conv's output,
    /// [`Var::add_conv2d`] also saves the conv's own output buffer.)
    pub fn add_owned(self, other: &Var<T>) -> Result<Var<T>> {
        let out_shape = broadcast_shapes("add", self.shape(), other.shape())?;
        let a_shape = self.shape().to_vec();
        let mut this = self;
        let a = this.take_value();
        let y = this
            .backend()
            .binary_owned(Binary::Add, a, other.value(), &out_shape)?;
        this.record_binary(Binary::Add, other, y, a_shape, None)
    }

    /// Record `y = self op other` (`a_shape` is `self`'s shape; `a` its
    /// value, which only a product keeps).
    fn record_binary(
        &self,
        op: Binary,
        other: &Var<T>,
        y: Tensor<T>,
        a_shape: Vec<usize>,
        a: Option<Tensor<T>>,
    ) -> Result<Var<T>> {
        // Keep only what the derivative reads: a sum or difference needs its
        // operands' shapes, a product or quotient the other operand (and a
        // quotient its output), so a sum of two activations holds neither.
        let b_shape = other.shape().to_vec();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::autograd::{Tape, Var};
    use crate::backend::CpuBackend;
    use crate::backend::cpu::testing::values;
    use crate::{ConvAlgo, Tensor};

    fn tensor(shape: &[usize], seed: u64) -> Tensor<f64> {
        let len = shape.iter().product();
        Tensor::from_vec(shape, values(len, seed)).unwrap()
    }

    /// `sum((2 x + w)^2)` by `add` or `add_owned`, with `keep` holding a
    /// second handle on `2 x` through the sum when set: the value of `2 x
    /// + w`, whether it took `2 x`'s buffer, what `keep` then reads, and
    /// the gradients of `x` and `w`.
    #[allow(clippy::type_complexity)]
    fn run(
        owned: bool,
        keep: bool,
        x_shape: &[usize],
        w_shape: &[usize],
    ) -> (Vec<f64>, bool, Option<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let tape = Tape::new(Arc::new(CpuBackend::new(ConvAlgo::Direct)));
        let (x, w) = (tape.leaf(tensor(x_shape, 1)), tape.leaf(tensor(w_shape, 2)));
        // `x + x`: a sum keeps no handle on its output (a unary op keeps
        // one for its derivative).
        let s = x.add(&x).unwrap();
        let kept: Option<Var<f64>> = keep.then(|| s.clone());
        let at = s.value().as_slice().as_ptr();
        let y = if owned {
            s.add_owned(&w).unwrap()
        } else {
            s.add(&w).unwrap()
        };
        let in_place = y.value().as_slice().as_ptr() == at;
        let value = y.value().as_slice().to_vec();
        let grads = y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var<f64>| grads.get(v).unwrap().as_slice().to_vec();
        let kept = kept.map(|k| k.value().as_slice().to_vec());
        (value, in_place, kept, grad(&x), grad(&w))
    }

    /// `add_owned` gives `add`'s values and gradients bit for bit; on the
    /// CPU backend it writes into its operand's buffer only where that is
    /// the operand's sole handle and both operands have the output's shape:
    /// a second handle still reads `2 x`, and a broadcast gets a new buffer.
    #[test]
    fn add_owned_is_add_written_in_place_where_nothing_else_reads() {
        let (full, bias) = ([2, 3, 4, 5], [1, 3, 1, 1]);
        for (x_shape, w_shape) in [(full, full), (full, bias), (bias, full)] {
            for keep in [false, true] {
                let (v, by_add, k, gx, gw) = run(false, keep, &x_shape, &w_shape);
                let (vo, in_place, ko, gxo, gwo) = run(true, keep, &x_shape, &w_shape);
                let what = format!("{x_shape:?} + {w_shape:?}, second handle {keep}");
                assert!(!by_add, "{what}: add writes a new buffer");
                let same_shapes = x_shape == w_shape;
                assert_eq!(in_place, !keep && same_shapes, "{what}: in place");
                assert_eq!(
                    (&v, &gx, &gw),
                    (&vo, &gxo, &gwo),
                    "{what}: value or gradients"
                );
                assert_eq!(k, ko, "{what}: the second handle's value");
                if let Some(k) = k {
                    let twice: Vec<f64> = tensor(&x_shape, 1)
                        .as_slice()
                        .iter()
                        .map(|a| 2.0 * a)
                        .collect();
                    assert_eq!(k, twice, "{what}: the second handle still reads 2 x");
                }
            }
        }
    }
}
