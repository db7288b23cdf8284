//! Every op, the tape and the loss graph refuse operands that do not fit
//! with a typed error (and the right kind), never a panic or a silently
//! broadcast result.

use std::sync::Arc;

use dmkd::backend::{InputMask, ReferenceBackend};
use dmkd::distill::{MaskMode, Method, Problem, evaluate};
use dmkd::gradcheck::{LossLevel, random_problem};
use dmkd::{Conv2dOptions, Tape, Tensor, Var};

fn tape() -> Tape<f64> {
    Tape::new(Arc::new(ReferenceBackend))
}

fn leaf(t: &Tape<f64>, shape: &[usize]) -> Var<f64> {
    t.leaf(Tensor::from_fn(shape, |i| i as f64 * 0.1 - 0.3).unwrap())
}

fn kind<T: std::fmt::Debug>(r: dmkd::Result<T>) -> &'static str {
    r.expect_err("the op must refuse these operands").kind()
}

#[test]
fn conv2d_operands() {
    let t = tape();
    let x = leaf(&t, &[2, 3, 5, 5]);
    let w = leaf(&t, &[4, 3, 3, 3]);
    let opts = Conv2dOptions::same(1);
    assert_eq!(
        kind(leaf(&t, &[3, 5, 5]).conv2d(&w, None, &opts)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(x.conv2d(&leaf(&t, &[4, 2, 3, 3]), None, &opts)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(x.conv2d(&w, Some(&leaf(&t, &[3])), &opts)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(leaf(&t, &[2, 3, 0, 5]).conv2d(&w, None, &opts)),
        "zero_sized"
    );
    assert_eq!(
        kind(x.conv2d(&w, None, &Conv2dOptions::default().with_stride([0, 1]))),
        "invalid_argument"
    );
    // A 7x7 kernel does not fit a 5x5 input without padding.
    assert_eq!(
        kind(x.conv2d(&leaf(&t, &[4, 3, 7, 7]), None, &Conv2dOptions::default())),
        "shape_mismatch"
    );
    let bad_mask = InputMask::Spatial(Tensor::ones(&[2, 5, 4]).unwrap());
    assert_eq!(
        kind(x.conv2d(&w, None, &opts.clone().with_mask(bad_mask))),
        "shape_mismatch"
    );
    let bad_mask = InputMask::Channel(Tensor::ones(&[2, 4]).unwrap());
    assert_eq!(
        kind(x.conv2d(&w, None, &opts.with_mask(bad_mask))),
        "shape_mismatch"
    );
}

#[test]
fn conv2d_stride_builder_strides() {
    let t = tape();
    let x = leaf(&t, &[1, 2, 6, 7]);
    let w = leaf(&t, &[3, 2, 1, 1]);
    let y = x
        .conv2d(&w, None, &Conv2dOptions::default().with_stride([2, 3]))
        .unwrap();
    assert_eq!(y.shape(), &[1, 3, 3, 3]);
}

#[test]
fn elementwise_and_reductions() {
    let t = tape();
    let a = leaf(&t, &[2, 3]);
    assert_eq!(kind(a.add(&leaf(&t, &[4]))), "shape_mismatch");
    assert_eq!(kind(a.mul(&leaf(&t, &[2, 3, 2]))), "shape_mismatch");
    assert_eq!(
        kind(a.mask_mul(&InputMask::Channel(Tensor::ones(&[2, 3]).unwrap()))),
        "shape_mismatch"
    );
    assert_eq!(kind(a.sum(&[2], false)), "invalid_argument");
    assert_eq!(kind(a.sum(&[1, 1], false)), "invalid_argument");
    assert_eq!(kind(a.mean(&[5], true)), "invalid_argument");
    assert_eq!(kind(a.softmax(2)), "invalid_argument");
    assert_eq!(kind(leaf(&t, &[2, 0]).softmax(1)), "zero_sized");
    assert_eq!(kind(a.sq_err_sum(&leaf(&t, &[3, 2]))), "shape_mismatch");
}

#[test]
fn layout_ops() {
    let t = tape();
    let a = leaf(&t, &[2, 3]);
    assert_eq!(kind(a.reshape(&[4, 2])), "shape_mismatch");
    assert_eq!(kind(a.narrow(2, 0, 1)), "invalid_argument");
    assert_eq!(kind(a.narrow(1, 2, 2)), "invalid_argument");
    assert_eq!(kind(a.narrow(1, 0, 0)), "invalid_argument");
    let e = a.narrow(1, 3, 0).unwrap_err().to_string();
    assert!(e.contains("length 0 along axis 1"), "{e}");
    assert_eq!(kind(a.narrow(1, usize::MAX, 2)), "invalid_argument");
    assert!(a.narrow(1, 1, 2).is_ok());
    assert_eq!(kind(a.index1(0)), "shape_mismatch");
}

#[test]
fn weighted_pair_sq_err_operands() {
    let t = tape();
    let (a, b, tt) = (leaf(&t, &[2, 3]), leaf(&t, &[2, 3]), leaf(&t, &[2, 3]));
    let (wa, wb) = (t.leaf(Tensor::scalar(0.3)), t.leaf(Tensor::scalar(0.7)));
    assert!(a.weighted_pair_sq_err(&b, &wa, &wb, &tt).is_ok());
    let odd = leaf(&t, &[3, 2]);
    assert_eq!(
        kind(a.weighted_pair_sq_err(&odd, &wa, &wb, &tt)),
        "shape_mismatch"
    );
    assert_eq!(
        kind(a.weighted_pair_sq_err(&b, &wa, &wb, &odd)),
        "shape_mismatch"
    );
    // Either weight alone not a scalar: the op's own refusal, naming both.
    let two = leaf(&t, &[2]);
    for (x, y) in [(&two, &wb), (&wa, &two)] {
        let e = a.weighted_pair_sq_err(&b, x, y, &tt).unwrap_err();
        assert_eq!(e.kind(), "shape_mismatch");
        assert!(e.to_string().contains("weights must be scalars"), "{e}");
    }
}

#[test]
fn autograd_misuse() {
    let t = tape();
    let other = tape();
    let a = leaf(&t, &[2]);
    assert_eq!(kind(a.add(&leaf(&other, &[2]))), "autograd");
    // Backward needs a single value that depends on a leaf.
    assert_eq!(kind(a.square().unwrap().backward()), "autograd");
    assert_eq!(kind(t.constant(Tensor::scalar(1.0)).backward()), "autograd");
    let l = a.square().unwrap().sum_all().unwrap();
    assert!(l.backward().is_ok());
    // The backward closures were consumed: a second pass is an error, not a panic.
    assert_eq!(kind(l.backward()), "autograd");
    // Another tape's leaf with the same node id (0) has no gradient in this
    // pass (its id was looked up as if it were this tape's: [2] for a [3]).
    let (t1, t2) = (tape(), tape());
    let (a, b) = (leaf(&t1, &[2]), leaf(&t2, &[3]));
    let g = a.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&a).is_some());
    assert!(g.get(&b).is_none());
    assert_eq!(g.get_or_zeros(&b).unwrap().shape(), &[3]);
}

/// `Problem`'s fields are public: a hand-built one that disagrees with
/// itself, or the wrong number of variables, is an error, not a panic.
#[test]
fn loss_graph_refuses_inconsistent_arguments() {
    let p = random_problem(
        &[LossLevel {
            method: Method::Dmkd,
            cs: 3,
            c: 3,
            h: 2,
            w: 2,
            mode: MaskMode::Topk,
            lambda_s: 0.5,
            lambda_c: 0.5,
            tau: 0.5,
            seed: 0,
        }],
        1,
        0,
    )
    .unwrap();
    let tape = Tape::new(Arc::new(ReferenceBackend) as dmkd::BackendRef<f64>);
    let students: Vec<Var<f64>> = p.students.iter().map(|s| tape.leaf(s.clone())).collect();
    let params: Vec<Var<f64>> = p
        .param_names()
        .iter()
        .map(|n| tape.leaf(p.params[n].clone()))
        .collect();
    assert!(p.loss_graph(&tape, &students, &params).is_ok());
    assert_eq!(
        p.loss_graph(&tape, &[], &params).unwrap_err().kind(),
        "invalid_argument"
    );
    assert_eq!(
        p.loss_graph(&tape, &students, &params[1..])
            .unwrap_err()
            .kind(),
        "invalid_argument"
    );
    for broken in 0..3 {
        let mut q = clone_problem(&p);
        match broken {
            0 => drop(q.students.pop()),
            1 => drop(q.teachers.pop()),
            _ => drop(q.specs.pop()),
        }
        assert_eq!(
            q.loss_graph(&tape, &students, &params).unwrap_err().kind(),
            "invalid_argument"
        );
    }
}

fn clone_problem(p: &Problem<f64>) -> Problem<f64> {
    Problem {
        config: p.config.clone(),
        shapes: p.shapes.clone(),
        specs: p.specs.clone(),
        students: p.students.clone(),
        teachers: p.teachers.clone(),
        params: p.params.clone(),
        boxes: p.boxes.clone(),
        sample_offset: p.sample_offset,
    }
}

/// FGD's GcBlock has C / 2 hidden channels: one teacher channel is an error.
#[test]
fn the_gcblock_needs_two_channels() {
    let level = |c: usize| LossLevel {
        method: Method::Fgd,
        cs: c,
        c,
        h: 2,
        w: 2,
        mode: MaskMode::Topk,
        lambda_s: 0.5,
        lambda_c: 0.5,
        tau: 0.5,
        seed: 0,
    };
    let be: dmkd::BackendRef<f64> = Arc::new(ReferenceBackend);
    assert!(evaluate(be.clone(), &random_problem(&[level(2)], 1, 0).unwrap()).is_ok());
    let one = random_problem(&[level(1)], 1, 0).unwrap();
    assert_eq!(evaluate(be, &one).unwrap_err().kind(), "shape_mismatch");
}
