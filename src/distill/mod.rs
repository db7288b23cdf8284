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
mod inputs;
mod limits;
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
pub use inputs::{
    box_name, is_box_name, level_param_specs, level_shape, read_boxes, student_name, teacher_name,
};
pub use limits::{DEFAULT_MAX_PROBLEM_BYTES, footprint_bytes, max_problem_bytes};
pub use params::ParamSpec;

/// Sizes of one level: batch, student channels, teacher channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelShape {
    /// Batch.
    pub n: usize,
    /// Student channels.
    pub cs: usize,
    /// Teacher channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

/// What a level's loss returns: the loss variable and named debug tensors.
#[derive(Debug)]
pub struct LevelOutput<T: Float> {
    /// The level's loss, on the tape.
    pub loss: Var<T>,
    /// Attention and masks under their exchange-format names.
    pub debug: Vec<(String, Tensor<T>)>,
}

/// The parameters of `config` for levels of the given `(student, teacher)`
/// channel counts, in [`Problem::param_names`] order, initialised from
/// `seed` exactly as [`Problem::new`] initialises absent ones (what a
/// framework module holding the parameters starts from).
pub fn init_params<T: Float>(
    config: &Config,
    channels: &[(usize, usize)],
    seed: u64,
) -> Result<Vec<(String, Tensor<T>)>> {
    config.validate()?;
    if channels.len() != config.levels.len() {
        return Err(Error::Config(format!(
            "{} levels configured but channel counts for {} given",
            config.levels.len(),
            channels.len()
        )));
    }
    let mut shapes = Vec::new();
    let mut specs = Vec::new();
    for (l, (lc, &(cs, c))) in config.levels.iter().zip(channels).enumerate() {
        if cs == 0 || c == 0 {
            return Err(Error::ZeroSized {
                what: format!("level {l}'s channels"),
                shape: vec![cs, c],
            });
        }
        // Parameters depend on the channels only; one 1x1 sample stands in
        // for the features in the memory check.
        let shape = LevelShape {
            n: 1,
            cs,
            c,
            h: 1,
            w: 1,
        };
        specs.push(level_param_specs(l, lc, &shape));
        shapes.push(shape);
    }
    limits::check_footprint::<T>(&shapes, &specs)?;
    specs
        .iter()
        .flatten()
        .map(|spec| Ok((spec.name.clone(), params::init_tensor(spec, seed)?)))
        .collect()
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
    /// The total loss.
    pub loss: T,
    /// Each level's loss, in level order.
    pub level_losses: Vec<T>,
    /// Every parameter used (supplied or initialised), by name.
    pub params: TensorMap<T>,
    /// `loss`, `p{l}.loss`, `grad.<name>` and the debug tensors.
    pub outputs: TensorMap<T>,
}

/// A validated problem: the config, each level's inputs and the parameters.
pub struct Problem<T: Float> {
    /// The validated config.
    pub config: Config,
    /// Each level's sizes.
    pub shapes: Vec<LevelShape>,
    /// Parameter specs per level, in a fixed order.
    pub specs: Vec<Vec<ParamSpec>>,
    /// Each level's student feature.
    pub students: Vec<Tensor<T>>,
    /// Each level's teacher feature.
    pub teachers: Vec<Tensor<T>>,
    /// Every parameter (supplied or initialised), by name.
    pub params: TensorMap<T>,
    /// FGD's boxes, when a level is FGD.
    pub boxes: Option<Boxes>,
    /// The global index of this batch's first sample: the Philox sample
    /// counter of local sample `n` is `sample_offset + n` (docs/spec.md,
    /// "Data parallel"; a DDP rank holding samples `[a, b)` of a batch uses
    /// `a`). 0 unless set with [`Problem::with_sample_offset`].
    pub sample_offset: usize,
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
        limits::check_footprint::<T>(&shapes, &specs)?;
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
        // Features of a level the config does not have: even where extra
        // tensors are allowed (a golden file's debug tensors), these mean
        // the config and the inputs disagree, and the level would be
        // silently left out of the loss.
        let level_of = |name: &str| {
            let level = |suffix: &str| {
                name.strip_prefix('p')
                    .and_then(|r| r.strip_suffix(suffix))
                    .and_then(|l| l.parse::<usize>().ok())
            };
            level(".student").or_else(|| level(".teacher"))
        };
        if let Some((name, l)) = tensors
            .keys()
            .find_map(|name| level_of(name).filter(|&l| l >= levels).map(|l| (name, l)))
        {
            return Err(Error::arg(
                "inputs",
                format!(
                    "tensor `{name}` is a feature of level {l}, but the config has {levels} level(s)"
                ),
            ));
        }
        if !opts.allow_extra {
            for name in tensors.keys() {
                let known = params.contains_key(name)
                    || (0..levels).any(|l| *name == student_name(l) || *name == teacher_name(l))
                    || (needs_boxes && (name == "img_shape" || is_box_name(name, shapes[0].n)));
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
            sample_offset: 0,
        })
    }

    /// The same problem as samples `[offset, offset + N)` of a larger batch
    /// (see [`Problem::sample_offset`]); an offset whose last sample counter
    /// does not fit 32 bits is an error.
    pub fn with_sample_offset(mut self, offset: usize) -> Result<Self> {
        // As the masks require: the end of the sample range fits 32 bits.
        let n = self.shapes.first().map_or(0, |s| s.n);
        let fits = offset
            .checked_add(n)
            .is_some_and(|end| end <= u32::MAX as usize);
        if !fits {
            return Err(Error::arg(
                "sample_offset",
                format!(
                    "samples {offset} .. {offset} + {n} exceed the 32-bit Philox sample counter"
                ),
            ));
        }
        self.sample_offset = offset;
        Ok(self)
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
                Method::Dmkd => dmkd::level_loss(student, &teacher, &vars, lc, self.sample_offset)?,
                Method::Mgd => mgd::level_loss(student, &teacher, &vars, lc, self.sample_offset)?,
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
