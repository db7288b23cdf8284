//! The rows of the conformance table: one backend call on fixed operands,
//! run on the reference and on every backend under test in f64 and f32, each
//! output compared by its backend's rule (`rules.rs`).

use dmkd::backend::{Backend, Binary, ConvArgs, ConvGeometry, InputMask, ReferenceBackend, Unary};
use dmkd::{DType, Float, Result, Tensor};

use super::backends::{Subject, backends};
use super::rules::{Class, Expected};

/// Which pass of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// `y = act(conv(x * m, w) + b)`; operands `[x, w]` or `[x, w, b]`.
    Forward { relu: bool },
    /// `dx`; operands `[dy, w]`.
    Input,
    /// `dw`; operands `[dy, x]`.
    Weight,
    /// `db`; operands `[dy]`.
    Bias,
}

/// One backend method and its non-tensor arguments.
#[derive(Clone, Debug)]
pub enum Op {
    Conv {
        pass: Pass,
        geom: ConvGeometry,
    },
    Unary(Unary),
    /// Operands `[x, dy]`; `y` is the reference's `f(x)`, as in the tape.
    UnaryBackward(Unary),
    Binary(Binary, Vec<usize>),
    MaskMul,
    SumAxes(Vec<usize>),
    BroadcastTo(Vec<usize>),
    Softmax(usize),
    /// Operands `[x, dy]`; `y` is the reference's softmax of `x`.
    SoftmaxBackward(usize),
    Narrow {
        axis: usize,
        start: usize,
        len: usize,
    },
    NarrowBackward {
        shape: Vec<usize>,
        axis: usize,
        start: usize,
    },
    SqErrSum,
    SqErrBackward(f64),
    /// Operands `[a, b, t]`; outputs `r = wa a + wb b - t`, `sum(r^2)`,
    /// `<r, a>`, `<r, b>`.
    WeightedPairResidual {
        wa: f64,
        wb: f64,
    },
}

/// One row: an op, its tensor operands (f32-representable values, held in
/// f64) and, for convolutions and `mask_mul`, an input mask.
#[derive(Clone, Debug)]
pub struct OpCase {
    pub op: Op,
    pub inputs: Vec<Tensor<f64>>,
    pub mask: Option<InputMask<f64>>,
}

fn abs(t: &Tensor<f64>) -> Tensor<f64> {
    Tensor::from_vec(t.shape(), t.as_slice().iter().map(|v| v.abs()).collect()).unwrap()
}

fn scalar<T: Float>(v: T) -> Tensor<T> {
    Tensor::scalar(v)
}

impl OpCase {
    pub fn new(op: Op, inputs: Vec<Tensor<f64>>, mask: Option<InputMask<f64>>) -> Self {
        OpCase { op, inputs, mask }
    }

    /// The outputs of the op on `be` in precision `T`.
    pub fn run<T: Float>(&self, be: &dyn Backend<T>) -> Result<Vec<Tensor<T>>> {
        let x: Vec<Tensor<T>> = self.inputs.iter().map(|t| t.cast()).collect();
        let mask = self.mask.as_ref().map(InputMask::cast::<T>);
        let c = T::from_f64;
        Ok(match &self.op {
            Op::Conv { pass, geom } => {
                let args = |relu| ConvArgs {
                    geom: *geom,
                    mask: mask.clone(),
                    relu,
                };
                vec![match pass {
                    Pass::Forward { relu } => be.conv2d(&x[0], &x[1], x.get(2), &args(*relu))?,
                    Pass::Input => be.conv2d_backward_input(&x[0], &x[1], &args(false))?,
                    Pass::Weight => be.conv2d_backward_weight(&x[0], &x[1], &args(false))?,
                    Pass::Bias => be.conv2d_backward_bias(&x[0])?,
                }]
            }
            Op::Unary(u) => vec![be.unary(*u, &x[0])?],
            Op::UnaryBackward(u) => {
                let y = ReferenceBackend.unary(*u, &x[0])?;
                vec![be.unary_backward(*u, &x[0], &y, &x[1])?]
            }
            Op::Binary(b, out) => vec![be.binary(*b, &x[0], &x[1], out)?],
            Op::MaskMul => vec![be.mask_mul(&x[0], mask.as_ref().expect("a mask"))?],
            Op::SumAxes(axes) => vec![be.sum_axes(&x[0], axes)?],
            Op::BroadcastTo(shape) => vec![be.broadcast_to(&x[0], shape)?],
            Op::Softmax(axis) => vec![be.softmax(&x[0], *axis)?],
            Op::SoftmaxBackward(axis) => {
                let y = ReferenceBackend.softmax(&x[0], *axis)?;
                vec![be.softmax_backward(&y, &x[1], *axis)?]
            }
            Op::Narrow { axis, start, len } => vec![be.narrow(&x[0], *axis, *start, *len)?],
            Op::NarrowBackward { shape, axis, start } => {
                vec![be.narrow_backward(&x[0], shape, *axis, *start)?]
            }
            Op::SqErrSum => vec![be.sq_err_sum(&x[0], &x[1])?],
            Op::SqErrBackward(g) => vec![be.sq_err_backward(&x[0], &x[1], c(*g))?],
            Op::WeightedPairResidual { wa, wb } => {
                let p = be.weighted_pair_residual(&x[0], &x[1], c(*wa), c(*wb), &x[2])?;
                vec![
                    p.residual,
                    scalar(p.sq_sum),
                    scalar(p.dot_a),
                    scalar(p.dot_b),
                ]
            }
        })
    }

    /// The case whose reference outputs are `sum|terms|` of this case's
    /// outputs (the floor of the sum bound), where the op sums.
    pub fn floor_case(&self) -> Option<OpCase> {
        let abs_all = || self.inputs.iter().map(abs).collect::<Vec<_>>();
        let abs_mask = self.mask.as_ref().map(|m| match m {
            InputMask::Spatial(t) => InputMask::Spatial(abs(t)),
            InputMask::Channel(t) => InputMask::Channel(abs(t)),
        });
        let op = match &self.op {
            // ReLU is 1-Lipschitz: the pre-activation's floor bounds it.
            Op::Conv {
                pass: Pass::Forward { .. },
                geom,
            } => Op::Conv {
                pass: Pass::Forward { relu: false },
                geom: *geom,
            },
            Op::Conv { .. } | Op::SumAxes(_) => self.op.clone(),
            // Every term (a - b)^2 is non-negative, and `a - b` rounds
            // relative to itself: the sum is its own floor.
            Op::SqErrSum => return Some(self.clone()),
            // r = wa a + wb b - t rounds relative to |wa a| + |wb b| + |t|:
            // the floors of the sums are the sums at |wa|, |wb|, |a|, |b|, -|t|.
            Op::WeightedPairResidual { wa, wb } => Op::WeightedPairResidual {
                wa: wa.abs(),
                wb: wb.abs(),
            },
            _ => return None,
        };
        let mut inputs = abs_all();
        if matches!(op, Op::WeightedPairResidual { .. }) {
            inputs[2] = Tensor::from_vec(
                inputs[2].shape(),
                inputs[2].as_slice().iter().map(|v| -v).collect(),
            )
            .unwrap();
        }
        Some(OpCase {
            op,
            inputs,
            mask: abs_mask,
        })
    }

    /// The class of each output (`rules.rs`).
    pub fn classes(&self) -> Vec<Class> {
        let numel = |t: &Tensor<f64>| t.numel();
        match &self.op {
            Op::Conv { pass, geom: g } => {
                let k = match pass {
                    // Cin*kh*kw products, the bias (and the mask's multiply).
                    Pass::Forward { .. } => g.c_in * g.kh * g.kw + 2,
                    // Cout*kh*kw products, then the mask.
                    Pass::Input => g.c_out * g.kh * g.kw + 2,
                    Pass::Weight | Pass::Bias => g.n * g.oh * g.ow + 2,
                };
                let winograd_shape = g.is_3x3_same() && *pass != Pass::Bias;
                vec![Class::Conv { k, winograd_shape }]
            }
            Op::Unary(Unary::Exp | Unary::Ln) => vec![Class::Transcendental],
            Op::Unary(_)
            | Op::UnaryBackward(_)
            | Op::Binary(..)
            | Op::MaskMul
            | Op::Narrow { .. }
            | Op::NarrowBackward { .. }
            | Op::SqErrBackward(_) => vec![Class::Exact],
            Op::BroadcastTo(_) => vec![Class::Copy],
            Op::Softmax(_) | Op::SoftmaxBackward(_) => vec![Class::Softmax],
            Op::SumAxes(axes) => {
                let x = &self.inputs[0];
                let len: usize = axes.iter().map(|&a| x.shape()[a]).product();
                vec![Class::SumAxes { k: len + 1, len }]
            }
            // n terms, each `a - b` and its square rounded.
            Op::SqErrSum => vec![Class::Loss {
                k: numel(&self.inputs[0]) + 2,
            }],
            // The residual is element-wise; the sums are n terms of r^2
            // (or r * a), r from three products and sums.
            Op::WeightedPairResidual { .. } => {
                let k = numel(&self.inputs[0]) + 4;
                vec![
                    Class::Exact,
                    Class::Loss { k },
                    Class::Loss { k },
                    Class::Loss { k },
                ]
            }
        }
    }

    fn what(&self) -> String {
        let shapes: Vec<&[usize]> = self.inputs.iter().map(|t| t.shape()).collect();
        let mask = match &self.mask {
            None => "",
            Some(InputMask::Spatial(_)) => " spatial mask",
            Some(InputMask::Channel(_)) => " channel mask",
        };
        format!("{:?} on {shapes:?}{mask}", self.op)
    }

    /// Run the case on the reference and on every backend under test, in
    /// f64 and f32, and hold each output to its backend's rule.
    pub fn conform(&self) {
        let want64 = self.run::<f64>(&ReferenceBackend).unwrap();
        let floor = self
            .floor_case()
            .map(|c| c.run::<f64>(&ReferenceBackend).unwrap());
        let classes = self.classes();
        self.conform_in::<f64>(&want64, floor.as_deref(), &classes);
        self.conform_in::<f32>(&want64, floor.as_deref(), &classes);
    }

    fn conform_in<T: dmkd::backend::BackendFloat>(
        &self,
        want64: &[Tensor<f64>],
        floor: Option<&[Tensor<f64>]>,
        classes: &[Class],
    ) {
        let want = self.run::<T>(&ReferenceBackend).unwrap();
        for s in backends::<T>() {
            self.check_subject(&s, &want, want64, floor, classes);
        }
    }

    fn check_subject<T: Float>(
        &self,
        s: &Subject<T>,
        want: &[Tensor<T>],
        want64: &[Tensor<f64>],
        floor: Option<&[Tensor<f64>]>,
        classes: &[Class],
    ) {
        let dtype: DType = T::DTYPE;
        let got = self
            .run::<T>(&*s.backend)
            .unwrap_or_else(|e| panic!("{} {dtype}: {}: {e}", s.name, self.what()));
        assert_eq!(got.len(), want.len());
        for (i, g) in got.iter().enumerate() {
            let what = format!("{} {dtype}: {} output {i}", s.name, self.what());
            let e = Expected {
                want: &want[i],
                want64: &want64[i],
                floor: floor.map(|f| &f[i]),
            };
            s.rule.check(classes[i], dtype).assert(&what, g, &e);
        }
        // The input gradient under a 0/1 mask is exactly zero where the
        // input was masked, on every backend.
        if let (
            Op::Conv {
                pass: Pass::Input,
                geom,
            },
            Some(m),
        ) = (&self.op, &self.mask)
            && m.tensor().as_slice().iter().all(|&v| v == 0.0 || v == 1.0)
        {
            let dims = geom.input_shape();
            let [_, c, h, w] = dims;
            for (i, v) in got[0].as_slice().iter().enumerate() {
                let (n, ch, p) = (i / (c * h * w), i / (h * w) % c, i % (h * w));
                if m.value(n, ch, p, dims) == 0.0 {
                    assert!(
                        *v == T::zero(),
                        "{} {dtype}: {}: dx[{i}] = {v:e} at a masked input",
                        s.name,
                        self.what()
                    );
                }
            }
        }
    }
}

/// The four passes of a convolution as table rows (bias, mask and ReLU as
/// given): forward, input, weight and bias gradients.
pub fn conv_cases(
    geom: ConvGeometry,
    x: Tensor<f64>,
    w: Tensor<f64>,
    b: Option<Tensor<f64>>,
    dy: Tensor<f64>,
    mask: Option<InputMask<f64>>,
    relu: bool,
) -> Vec<OpCase> {
    let conv = |pass| Op::Conv { pass, geom };
    let mut fwd = vec![x.clone(), w.clone()];
    fwd.extend(b);
    vec![
        OpCase::new(conv(Pass::Forward { relu }), fwd, mask.clone()),
        OpCase::new(conv(Pass::Input), vec![dy.clone(), w], mask.clone()),
        OpCase::new(conv(Pass::Weight), vec![dy.clone(), x], mask),
        OpCase::new(conv(Pass::Bias), vec![dy], None),
    ]
}
