//! The distillation losses, built only from the engine's public ops:
//! DMKD (the product), MGD and FGD (baselines), over several FPN levels.
//!
//! [`evaluate`] is the one entry point the CLI, the tests and the demo use:
//! it validates named tensors (exchange-format names), builds the graph on a
//! tape, runs the backward pass, and returns the loss, per-level losses,
//! every gradient and the debug tensors under their exchange-format names.

pub mod attention;
pub mod config;
pub mod dmkd;
pub mod fgd;
pub mod generator;
pub mod mask;
pub mod mgd;
pub mod params;

use crate::autograd::{Tape, Var};
use crate::backend::BackendRef;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

pub use crate::named::TensorMap;
pub use config::{Config, LevelConfig, MaskMode, Method};
pub use fgd::Boxes;
pub use params::ParamSpec;

/// Sizes of one level: batch, student channels, teacher channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelShape {
    pub n: usize,
    pub cs: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// What a level's loss returns: the loss variable and named debug tensors.
#[derive(Debug)]
pub struct LevelOutput<T: Float> {
    pub loss: Var<T>,
    pub debug: Vec<(String, Tensor<T>)>,
}

/// Exchange-format names of a level's inputs.
pub fn student_name(level: usize) -> String {
    format!("p{level}.student")
}
pub fn teacher_name(level: usize) -> String {
    format!("p{level}.teacher")
}

/// The parameters a level expects.
pub fn level_param_specs(level: usize, cfg: &LevelConfig, shape: &LevelShape) -> Vec<ParamSpec> {
    match cfg.method {
        Method::Dmkd => dmkd::param_specs(level, shape),
        Method::Mgd => mgd::param_specs(level, shape),
        Method::Fgd => fgd::param_specs(level, shape),
    }
}

/// Read and check the student and teacher of a level.
pub fn level_shape<T: Float>(tensors: &TensorMap<T>, level: usize) -> Result<LevelShape> {
    let get = |name: String| tensors.get(&name).ok_or(Error::MissingTensor(name));
    let (sn, tn) = (student_name(level), teacher_name(level));
    let s = get(sn.clone())?;
    let t = get(tn.clone())?;
    let [n, cs, h, w] = s.dims4("student feature").map_err(|_| Error::TensorShape {
        name: sn.clone(),
        expected: vec![0, 0, 0, 0],
        got: s.shape().to_vec(),
    })?;
    let [tn_, c, th, tw] = t.dims4("teacher feature").map_err(|_| Error::TensorShape {
        name: tn.clone(),
        expected: vec![0, 0, 0, 0],
        got: t.shape().to_vec(),
    })?;
    s.check_nonempty(&sn)?;
    t.check_nonempty(&tn)?;
    if (n, h, w) != (tn_, th, tw) {
        return Err(Error::shape(
            "level inputs",
            format!(
                "level {level}: student {:?} and teacher {:?} differ in N, H or W",
                s.shape(),
                t.shape()
            ),
        ));
    }
    s.check_finite(&sn)?;
    t.check_finite(&tn)?;
    Ok(LevelShape { n, cs, c, h, w })
}

/// Read the FGD boxes (`gt_boxes.{n}` `[K, 4]`, `img_shape` `[N, 2]`).
pub fn read_boxes<T: Float>(tensors: &TensorMap<T>, n: usize) -> Result<Boxes> {
    let shape = tensors
        .get("img_shape")
        .ok_or_else(|| Error::MissingTensor("img_shape".into()))?;
    if shape.shape() != [n, 2] {
        return Err(Error::TensorShape {
            name: "img_shape".into(),
            expected: vec![n, 2],
            got: shape.shape().to_vec(),
        });
    }
    shape.check_finite("img_shape")?;
    let s = shape.as_slice();
    let mut boxes = Boxes::default();
    for i in 0..n {
        boxes
            .img_shape
            .push([s[2 * i].as_f64(), s[2 * i + 1].as_f64()]);
        let name = format!("gt_boxes.{i}");
        let b = tensors
            .get(&name)
            .ok_or_else(|| Error::MissingTensor(name.clone()))?;
        if b.rank() != 2 || b.shape()[1] != 4 {
            return Err(Error::TensorShape {
                name,
                expected: vec![b.shape().first().copied().unwrap_or(0), 4],
                got: b.shape().to_vec(),
            });
        }
        b.check_finite(&name)?;
        boxes.per_image.push(
            b.as_slice()
                .chunks_exact(4)
                .map(|r| [r[0].as_f64(), r[1].as_f64(), r[2].as_f64(), r[3].as_f64()])
                .collect(),
        );
    }
    boxes.validate(n)?;
    Ok(boxes)
}

/// Default bound on a problem's memory when `/proc/meminfo` cannot be read:
/// `MAX_ELEMENTS` f32 values (64 GiB).
pub const DEFAULT_MAX_PROBLEM_BYTES: u64 = (crate::tensor::MAX_ELEMENTS as u64) * 4;

/// The memory a problem may need: `DMKD_MAX_PROBLEM_BYTES` if set, else the
/// machine's physical memory (MemTotal), capped at
/// [`DEFAULT_MAX_PROBLEM_BYTES`].
pub fn max_problem_bytes() -> u64 {
    if let Some(v) = std::env::var("DMKD_MAX_PROBLEM_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return v;
    }
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    });
    total.map_or(DEFAULT_MAX_PROBLEM_BYTES, |t| {
        t.min(DEFAULT_MAX_PROBLEM_BYTES)
    })
}

/// Refuse a problem whose memory surely exceeds [`max_problem_bytes`],
/// before any parameter is initialised. Each tensor fits `MAX_ELEMENTS`, but
/// a 80 KB teacher of shape `[1, 40000, 1, 1]` asks for four 40000x40000x3x3
/// generator weights (230 GB in f32): without this check it would abort on a
/// failed allocation. The estimate is a lower bound (each parameter and its
/// gradient, the inputs, and the four generator outputs each level keeps for
/// the backward pass), so a refusal is never wrong.
/// The lower-bound memory estimate of [`check_footprint`], in bytes.
pub fn footprint_bytes(shapes: &[LevelShape], specs: &[Vec<ParamSpec>], elem_size: usize) -> u128 {
    let mut elements: u128 = 0;
    for (shape, level_specs) in shapes.iter().zip(specs) {
        for spec in level_specs {
            let n = spec
                .shape
                .iter()
                .fold(1u128, |a, &d| a.saturating_mul(d as u128));
            elements = elements.saturating_add(n.saturating_mul(2));
        }
        let plane = (shape.n as u128) * (shape.h as u128) * (shape.w as u128);
        let inputs = plane.saturating_mul(shape.cs as u128 + shape.c as u128);
        let activations = plane.saturating_mul(shape.c as u128).saturating_mul(4);
        elements = elements.saturating_add(inputs).saturating_add(activations);
    }
    elements.saturating_mul(elem_size as u128)
}

fn check_footprint<T: Float>(shapes: &[LevelShape], specs: &[Vec<ParamSpec>]) -> Result<()> {
    let bytes = footprint_bytes(shapes, specs, T::DTYPE.size_of());
    within_limit(bytes, max_problem_bytes() as u128)
}

/// `bytes` may use up to `limit` bytes, inclusive.
fn within_limit(bytes: u128, limit: u128) -> Result<()> {
    if bytes > limit {
        return Err(Error::TooLarge {
            what: "the problem (parameters, gradients, inputs and activations; a lower bound)"
                .into(),
            bytes,
            limit,
        });
    }
    Ok(())
}

/// Options of [`evaluate`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalOptions {
    /// Initialise absent parameters from this seed instead of failing.
    pub init_seed: Option<u64>,
    /// Ignore tensors that are neither inputs nor parameters (e.g. the
    /// outputs stored in a golden file) instead of failing.
    pub allow_extra: bool,
}

/// The result of one evaluation.
#[derive(Debug)]
pub struct Evaluation<T: Float> {
    pub loss: T,
    pub level_losses: Vec<T>,
    /// Every parameter used (supplied or initialised), by name.
    pub params: TensorMap<T>,
    /// `loss`, `p{l}.loss`, `grad.<name>` and the debug tensors.
    pub outputs: TensorMap<T>,
}

/// A validated problem: the config, each level's inputs and the parameters.
pub struct Problem<T: Float> {
    pub config: Config,
    pub shapes: Vec<LevelShape>,
    /// Parameter specs per level, in a fixed order.
    pub specs: Vec<Vec<ParamSpec>>,
    pub students: Vec<Tensor<T>>,
    pub teachers: Vec<Tensor<T>>,
    /// Every parameter (supplied or initialised), by name.
    pub params: TensorMap<T>,
    pub boxes: Option<Boxes>,
}

impl<T: Float> Problem<T> {
    /// Validate named tensors against a config.
    ///
    /// `tensors` holds the inputs (`p{l}.student`, `p{l}.teacher`, and for
    /// FGD `gt_boxes.{n}` and `img_shape`) and the parameters, by
    /// exchange-format name. Every name must be known unless
    /// `opts.allow_extra`: a misspelt parameter must not be silently
    /// replaced by a fresh initialisation.
    pub fn new(config: &Config, tensors: &TensorMap<T>, opts: EvalOptions) -> Result<Self> {
        config.validate()?;
        let mut shapes = Vec::new();
        let mut specs = Vec::new();
        for (l, lc) in config.levels.iter().enumerate() {
            let shape = level_shape(tensors, l)?;
            if let Some(first) = shapes.first().map(|s: &LevelShape| s.n)
                && first != shape.n
            {
                return Err(Error::shape(
                    "levels",
                    format!("level {l} has batch {} but level 0 has {first}", shape.n),
                ));
            }
            specs.push(level_param_specs(l, lc, &shape));
            shapes.push(shape);
        }
        check_footprint::<T>(&shapes, &specs)?;
        let needs_boxes = config.levels.iter().any(|l| l.method == Method::Fgd);
        let boxes = if needs_boxes {
            Some(read_boxes(tensors, shapes[0].n)?)
        } else {
            None
        };
        let mut params = TensorMap::new();
        for spec in specs.iter().flatten() {
            let t = match (tensors.get(&spec.name), opts.init_seed) {
                (Some(t), _) => {
                    params::check_param(spec, t)?;
                    t.clone()
                }
                (None, Some(seed)) => params::init_tensor(spec, seed)?,
                (None, None) => return Err(Error::MissingTensor(spec.name.clone())),
            };
            params.insert(spec.name.clone(), t);
        }
        let levels = config.levels.len();
        if !opts.allow_extra {
            for name in tensors.keys() {
                let known = params.contains_key(name)
                    || (0..levels).any(|l| *name == student_name(l) || *name == teacher_name(l))
                    || (needs_boxes && (name == "img_shape" || name.starts_with("gt_boxes.")));
                if !known {
                    return Err(Error::UnexpectedTensor(name.clone()));
                }
            }
        }
        Ok(Problem {
            config: config.clone(),
            students: (0..levels)
                .map(|l| tensors[&student_name(l)].clone())
                .collect(),
            teachers: (0..levels)
                .map(|l| tensors[&teacher_name(l)].clone())
                .collect(),
            shapes,
            specs,
            params,
            boxes,
        })
    }

    /// Parameter names in a fixed order (level by level, spec order).
    pub fn param_names(&self) -> Vec<String> {
        self.specs
            .iter()
            .flatten()
            .map(|s| s.name.clone())
            .collect()
    }

    /// Build the total loss on `tape` from student variables (one per level)
    /// and parameter variables (in `param_names()` order).
    pub fn loss_graph(
        &self,
        tape: &Tape<T>,
        students: &[Var<T>],
        params: &[Var<T>],
    ) -> Result<(Var<T>, Vec<LevelOutput<T>>)> {
        let names = self.param_names();
        let levels = self.config.levels.len();
        if self.students.len() != levels
            || self.teachers.len() != levels
            || self.specs.len() != levels
        {
            return Err(Error::arg(
                "loss_graph",
                "the problem's levels, inputs and specs disagree",
            ));
        }
        if students.len() != self.students.len() || params.len() != names.len() {
            return Err(Error::arg(
                "loss_graph",
                format!(
                    "{} students and {} parameters given, {} and {} expected",
                    students.len(),
                    params.len(),
                    self.students.len(),
                    names.len()
                ),
            ));
        }
        let mut by_name: std::collections::BTreeMap<String, Var<T>> =
            names.into_iter().zip(params.iter().cloned()).collect();
        let mut outs = Vec::with_capacity(students.len());
        for (l, lc) in self.config.levels.iter().enumerate() {
            let teacher = tape.constant(self.teachers[l].clone());
            // `Problem`'s fields are public: a hand-built one can disagree
            // with itself, so lookups fail with errors, not panics.
            let own = self.specs[l]
                .iter()
                .map(|s| {
                    by_name
                        .remove(&s.name)
                        .map(|v| (s.name.clone(), v))
                        .ok_or_else(|| Error::MissingTensor(s.name.clone()))
                })
                .collect::<Result<_>>()?;
            let vars = params::LevelVars::from_vars(l, own);
            let student = &students[l];
            outs.push(match lc.method {
                Method::Dmkd => dmkd::level_loss(student, &teacher, &vars, lc)?,
                Method::Mgd => mgd::level_loss(student, &teacher, &vars, lc)?,
                Method::Fgd => fgd::level_loss(
                    student,
                    &teacher,
                    &vars,
                    lc,
                    self.boxes.as_ref().ok_or_else(|| {
                        Error::MissingTensor("gt_boxes (an fgd level needs boxes)".into())
                    })?,
                )?,
            });
        }
        let Some((first, rest)) = outs.split_first() else {
            return Err(Error::Config("no levels".into()));
        };
        let mut total = first.loss.clone();
        for o in rest {
            total = total.add(&o.loss)?;
        }
        Ok((total, outs))
    }
}

/// The total loss and the per-level losses, without gradients: every input
/// is a constant, so the tape records nothing (PyTorch's `no_grad`).
pub fn forward<T: Float>(backend: BackendRef<T>, problem: &Problem<T>) -> Result<(T, Vec<T>)> {
    let tape = Tape::new(backend);
    let students: Vec<Var<T>> = problem
        .students
        .iter()
        .map(|s| tape.constant(s.clone()))
        .collect();
    let params: Vec<Var<T>> = problem
        .param_names()
        .iter()
        .map(|n| tape.constant(problem.params[n].clone()))
        .collect();
    let (total, outs) = problem.loss_graph(&tape, &students, &params)?;
    let levels = outs
        .iter()
        .map(|o| o.loss.value().item())
        .collect::<Result<_>>()?;
    // As in `evaluate`: an overflowed loss is an error, not a result.
    total
        .value()
        .check_finite("loss (overflow: inputs too large for this precision)")?;
    Ok((total.value().item()?, levels))
}

/// Compute the loss over every level and the gradient of every student
/// feature and parameter, on `backend`.
pub fn evaluate<T: Float>(backend: BackendRef<T>, problem: &Problem<T>) -> Result<Evaluation<T>> {
    let tape = Tape::new(backend);
    let students: Vec<Var<T>> = problem
        .students
        .iter()
        .map(|s| tape.leaf(s.clone()))
        .collect();
    let names = problem.param_names();
    let params: Vec<Var<T>> = names
        .iter()
        .map(|n| tape.leaf(problem.params[n].clone()))
        .collect();
    let (total, outs) = problem.loss_graph(&tape, &students, &params)?;
    let grads = total.backward()?;

    let mut outputs = TensorMap::new();
    let mut level_losses = Vec::with_capacity(outs.len());
    for (l, out) in outs.into_iter().enumerate() {
        let v = out.loss.value().item()?;
        level_losses.push(v);
        outputs.insert(format!("p{l}.loss"), Tensor::scalar(v));
        outputs.extend(out.debug);
    }
    let loss = total.value().item()?;
    outputs.insert("loss".into(), Tensor::scalar(loss));
    for (l, s) in students.iter().enumerate() {
        outputs.insert(format!("grad.{}", student_name(l)), grads.get_or_zeros(s)?);
    }
    for (name, v) in names.iter().zip(&params) {
        outputs.insert(format!("grad.{name}"), grads.get_or_zeros(v)?);
    }
    // Finite inputs can still overflow (features near the float's maximum
    // square to infinity); an infinite or NaN loss or gradient is reported as
    // an error naming the first such output rather than written out as if
    // it were a result. `loss` first, so the message names the loss itself.
    outputs["loss"].check_finite("loss (overflow: inputs too large for this precision)")?;
    for (name, t) in &outputs {
        t.check_finite(&format!(
            "output {name} (overflow: inputs too large for this precision)"
        ))?;
    }
    Ok(Evaluation {
        loss,
        level_losses,
        params: problem.params.clone(),
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;
    use std::sync::Arc;

    #[test]
    fn footprint_counts_params_twice_inputs_and_four_activations() {
        let shape = LevelShape {
            n: 2,
            cs: 3,
            c: 4,
            h: 5,
            w: 6,
        };
        let specs = vec![vec![ParamSpec::new(
            "a".into(),
            &[4, 3, 1, 1],
            params::Init::Zeros,
        )]];
        // params 12 * 2, inputs 60 * (3 + 4), activations 60 * 4 * 4, in f32.
        let want = (12 * 2 + 60 * 7 + 60 * 16) * 4;
        assert_eq!(footprint_bytes(&[shape], &specs, 4), want as u128);
        assert_eq!(
            footprint_bytes(&[shape, shape], &[specs[0].clone(), vec![]], 8),
            (want * 2 - 24 * 4) as u128 * 2
        );
    }

    #[test]
    fn the_memory_limit_is_inclusive() {
        assert!(within_limit(100, 100).is_ok());
        assert_eq!(within_limit(101, 100).unwrap_err().kind(), "too_large");
    }

    #[test]
    fn loss_graph_refuses_inconsistent_arguments() {
        let p = crate::gradcheck::random_problem(
            &[crate::gradcheck::LossLevel {
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
        let tape = Tape::new(Arc::new(ReferenceBackend) as BackendRef<f64>);
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
        }
    }
}
