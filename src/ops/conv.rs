//! 2-d convolution (NCHW, OIHW weights), with an optional constant input
//! mask and a fused ReLU.
//!
//! Forward: `y = act(conv(x * m, w) + b)`.
//! Backward, with `dz = dy * act'(y)` (for ReLU, `act'(y) = [y > 0]`, the same
//! as `[z > 0]`):
//! - `dx = m * conv_transpose(dz, w)` (the mask is a constant multiplier),
//! - `dw[o, i, ky, kx] = sum_{n, oy, ox} dz[n, o, oy, ox] * (x * m)[n, i, oy*s + ky - p, ox*s + kx - p]`,
//! - `db[o] = sum_{n, oy, ox} dz[n, o, oy, ox]`.

use crate::autograd::Var;
use crate::backend::{Backend, ConvArgs, ConvGeometry, InputMask, Unary};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// Options of [`Var::conv2d`].
#[derive(Clone, Debug)]
pub struct Conv2dOptions<T: Float> {
    /// Stride (rows, columns); default 1.
    pub stride: [usize; 2],
    /// Zero padding (rows, columns); default 0.
    pub padding: [usize; 2],
    /// A constant multiplier of the input (spatial `[N,H,W]` or channel `[N,C]`).
    pub mask: Option<InputMask<T>>,
    /// Apply ReLU to the output.
    pub relu: bool,
}

impl<T: Float> Default for Conv2dOptions<T> {
    fn default() -> Self {
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            mask: None,
            relu: false,
        }
    }
}

impl<T: Float> Conv2dOptions<T> {
    /// Stride 1, zero padding `p` on every side.
    pub fn same(p: usize) -> Self {
        Conv2dOptions {
            padding: [p, p],
            ..Default::default()
        }
    }
    /// The same options with stride `s`.
    pub fn with_stride(mut self, s: [usize; 2]) -> Self {
        self.stride = s;
        self
    }
    /// The same options with input mask `m`.
    pub fn with_mask(mut self, m: InputMask<T>) -> Self {
        self.mask = Some(m);
        self
    }
    /// The same options with the fused ReLU on or off.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }
}

/// Validate the operands of a convolution and collect its kernel arguments.
pub fn conv_args<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    b: Option<&Tensor<T>>,
    opts: &Conv2dOptions<T>,
) -> Result<ConvArgs<T>> {
    let geom = ConvGeometry::new(x.shape(), w.shape(), opts.stride, opts.padding)?;
    if let Some(b) = b
        && b.shape() != [geom.c_out]
    {
        return Err(Error::shape(
            "conv2d",
            format!("bias of shape {:?}, expected [{}]", b.shape(), geom.c_out),
        ));
    }
    if let Some(m) = &opts.mask {
        m.check("conv2d", geom.input_shape())?;
    }
    Ok(ConvArgs {
        geom,
        mask: opts.mask.clone(),
        relu: opts.relu,
    })
}

impl<T: Float> Var<T> {
    /// `act(conv2d(self * mask, w) + b)`; see the module docs for the derivative.
    pub fn conv2d(
        &self,
        w: &Var<T>,
        b: Option<&Var<T>>,
        opts: &Conv2dOptions<T>,
    ) -> Result<Var<T>> {
        let args = conv_args(self.value(), w.value(), b.map(Var::value), opts)?;
        let y = self
            .backend()
            .conv2d(self.value(), w.value(), b.map(Var::value), &args)?;
        let (x_val, w_val) = (self.value().clone(), w.value().clone());
        let y_val = args.relu.then(|| y.clone());
        let mut inputs = vec![self, w];
        inputs.extend(b);
        self.tape().record(&inputs, y, move |be, dy, needs| {
            // The output is dropped as soon as the ReLU's derivative is
            // applied, which the backend may write into the gradient's own
            // buffer: one activation and one gradient less at the peak of
            // the backward pass.
            let dz = match y_val {
                Some(y) => be.unary_backward_owned(Unary::Relu, &y, &y, dy)?,
                None => dy,
            };
            conv_grads(be, &dz, needs, &x_val, &w_val, &args)
        })
    }
}

/// The gradients of a conv's operands `[x, w]` or `[x, w, b]` from the
/// gradient `dz` of its output before any activation, each only where
/// `needs` asks for it.
fn conv_grads<T: Float>(
    be: &dyn Backend<T>,
    dz: &Tensor<T>,
    needs: &[bool],
    x: &Tensor<T>,
    w: &Tensor<T>,
    args: &ConvArgs<T>,
) -> Result<Vec<Option<Tensor<T>>>> {
    let dx = if needs[0] {
        Some(be.conv2d_backward_input(dz, w, args)?)
    } else {
        None
    };
    let dw = if needs[1] {
        Some(be.conv2d_backward_weight(dz, x, args)?)
    } else {
        None
    };
    let mut grads = vec![dx, dw];
    if needs.len() == 3 {
        grads.push(if needs[2] {
            Some(be.conv2d_backward_bias(dz)?)
        } else {
            None
        });
    }
    Ok(grads)
}

impl<T: Float> Var<T> {
    /// `self + x.conv2d(w, b, opts)` for a `self` the caller gives up: the
    /// same values and gradients as [`Var::add`] of the two, without the
    /// conv's output as a tensor of its own (a backend may write the sums
    /// into `self`'s buffer: `Backend::conv2d_add`). `self` must have the
    /// conv's output shape; `opts.relu` is refused (the sum does not keep
    /// the conv's output, which the ReLU's derivative reads).
    pub fn add_conv2d(
        self,
        x: &Var<T>,
        w: &Var<T>,
        b: Option<&Var<T>>,
        opts: &Conv2dOptions<T>,
    ) -> Result<Var<T>> {
        let args = conv_args(x.value(), w.value(), b.map(Var::value), opts)?;
        if args.relu {
            return Err(Error::InvalidArgument {
                op: "add_conv2d",
                detail: "a ReLU on the conv (its derivative needs the conv's own output)".into(),
            });
        }
        let out_shape = args.geom.output_shape();
        if self.shape() != out_shape.as_slice() {
            return Err(Error::shape(
                "add_conv2d",
                format!(
                    "base of shape {:?} for a conv output of {out_shape:?}",
                    self.shape()
                ),
            ));
        }
        let mut this = self;
        let base = this.take_value();
        let y = this
            .backend()
            .conv2d_add(base, x.value(), w.value(), b.map(Var::value), &args)?;
        let (x_val, w_val) = (x.value().clone(), w.value().clone());
        let mut inputs = vec![&this, x, w];
        inputs.extend(b);
        this.tape().record(&inputs, y, move |be, g, needs| {
            let mut grads = vec![None];
            grads.extend(conv_grads(be, &g, &needs[1..], &x_val, &w_val, &args)?);
            // The base's gradient is the output's, passed on last.
            grads[0] = needs[0].then_some(g);
            Ok(grads)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{each_subset_of_leaves, values};
    use super::*;

    #[test]
    fn options_builders_set_what_they_name() {
        let mask = InputMask::Channel(values(&[1, 2], 0));
        let o = Conv2dOptions::<f64>::same(2)
            .with_stride([3, 1])
            .with_relu(true)
            .with_mask(mask);
        assert_eq!((o.stride, o.padding, o.relu), ([3, 1], [2, 2], true));
        assert!(matches!(o.mask, Some(InputMask::Channel(_))));
        assert!(!o.with_relu(false).relu);
        let d = Conv2dOptions::<f64>::default();
        assert_eq!((d.stride, d.padding, d.relu), ([1, 1], [0, 0], false));
        assert!(d.mask.is_none());
    }

    #[test]
    fn conv2d_gradients_for_every_subset_of_leaves() {
        let inputs = [
            values(&[2, 2, 5, 4], 0),
            values(&[3, 2, 3, 3], 1),
            values(&[3], 2),
        ];
        let spatial = InputMask::Spatial(values(&[2, 5, 4], 3));
        for opts in [
            Conv2dOptions::same(1).with_relu(true),
            Conv2dOptions::same(1)
                .with_stride([2, 1])
                .with_mask(spatial),
        ] {
            each_subset_of_leaves(&inputs, |v| {
                v[0].conv2d(&v[1], Some(&v[2]), &opts)?.square()?.sum_all()
            });
            each_subset_of_leaves(&inputs[..2], |v| {
                v[0].conv2d(&v[1], None, &opts)?.square()?.sum_all()
            });
        }
    }

    /// `base + conv2d(x, w, b)` with and without the bias, dense and under
    /// a spatial mask, strided; the base's gradient is the output's.
    #[test]
    fn add_conv2d_gradients_for_every_subset_of_leaves() {
        let inputs = [
            values(&[2, 2, 5, 4], 0),
            values(&[3, 2, 3, 3], 1),
            values(&[3], 2),
        ];
        let spatial = InputMask::Spatial(values(&[2, 5, 4], 3));
        for (opts, out) in [
            (Conv2dOptions::same(1), [2, 3, 5, 4]),
            (
                Conv2dOptions::same(1)
                    .with_stride([2, 1])
                    .with_mask(spatial),
                [2, 3, 3, 4],
            ),
        ] {
            let mut with_base = inputs.to_vec();
            with_base.push(values(&out, 4));
            each_subset_of_leaves(&with_base, |v| {
                v[3].clone()
                    .add_conv2d(&v[0], &v[1], Some(&v[2]), &opts)?
                    .square()?
                    .sum_all()
            });
            let no_bias = [inputs[0].clone(), inputs[1].clone(), values(&out, 4)];
            each_subset_of_leaves(&no_bias, |v| {
                v[2].clone()
                    .add_conv2d(&v[0], &v[1], None, &opts)?
                    .square()?
                    .sum_all()
            });
        }
    }
}
