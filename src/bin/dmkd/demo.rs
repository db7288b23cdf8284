//! The main job: train with DMKD on built-in synthetic FPN features.
//!
//! A fixed, structured teacher and a student that starts as noise. Each
//! step evaluates the loss over every level, then AdamW updates the
//! generation blocks, the fusion logits, the align convs and the student
//! features themselves (standing in for the student network's output).

use std::path::PathBuf;
use std::time::Instant;

use crate::plot::{Series, write_csv, write_png};
use dmkd::backend::{BackendFloat, BackendOptions, make_backend};
use dmkd::distill::{EvalOptions, Problem, TensorMap, evaluate, student_name};
use dmkd::error::Result;
use dmkd::optim::{Optimizer, OptimizerKind};
use dmkd::synthetic::{Preset, inputs};

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub preset: Preset,
    pub steps: usize,
    pub seed: u64,
    /// AdamW learning rate of the loss's parameters.
    pub lr_params: f64,
    /// AdamW learning rate of the student features.
    pub lr_student: f64,
    pub backend: BackendOptions,
    /// Directory for `loss.csv` and `loss.png`.
    pub out_dir: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            preset: Preset::named("demo").expect("built-in preset"),
            steps: 300,
            seed: 0,
            lr_params: 3e-3,
            lr_student: 3e-2,
            backend: BackendOptions::default(),
            out_dir: PathBuf::from("out"),
        }
    }
}

/// What a demo run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    pub steps: usize,
    pub level_names: Vec<String>,
    pub initial_loss: f64,
    pub final_loss: f64,
    pub initial_level_losses: Vec<f64>,
    pub final_level_losses: Vec<f64>,
    /// `softmax(theta)` per level after training: (w_s, w_c).
    pub fusion_weights: Vec<(f64, f64)>,
    pub seconds: f64,
    pub csv: PathBuf,
    pub png: PathBuf,
}

/// Run the demo; `progress(step, loss)` is called after every step.
pub fn run_demo<T: BackendFloat>(
    opts: &DemoOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<DemoReport> {
    // The output directory first: a path that cannot be one (a file of
    // that name) fails now, not after the whole training run.
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| dmkd::Error::Io {
        path: opts.out_dir.display().to_string(),
        source: e,
    })?;
    let backend = make_backend::<T>(opts.backend)?;
    let preset = &opts.preset;
    let config = preset.config();
    let mut tensors: TensorMap<T> = inputs(preset, opts.seed)?;
    let init = Problem::new(
        &config,
        &tensors,
        EvalOptions {
            init_seed: Some(opts.seed),
            allow_extra: false,
        },
    )?;
    let mut params = init.params.clone();
    let mut students: TensorMap<T> = (0..preset.levels.len())
        .map(|l| (student_name(l), tensors[&student_name(l)].clone()))
        .collect();
    let mut opt_params = Optimizer::new(OptimizerKind::adamw(opts.lr_params));
    let mut opt_students = Optimizer::new(OptimizerKind::AdamW {
        lr: opts.lr_student,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let levels = preset.levels.len();
    let mut curves: Vec<Vec<(usize, f64)>> = vec![Vec::new(); levels + 1];
    let start = Instant::now();
    let mut first: Option<(f64, Vec<f64>)> = None;
    let mut last = (0.0, Vec::new(), Vec::new());
    for step in 0..=opts.steps {
        tensors.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
        tensors.extend(students.iter().map(|(k, v)| (k.clone(), v.clone())));
        let problem = Problem::new(&config, &tensors, EvalOptions::default())?;
        let eval = evaluate(backend.clone(), &problem)?;
        let loss = eval.loss.as_f64();
        let per_level: Vec<f64> = eval.level_losses.iter().map(|v| v.as_f64()).collect();
        curves[0].push((step, loss));
        for (l, v) in per_level.iter().enumerate() {
            curves[l + 1].push((step, *v));
        }
        first.get_or_insert_with(|| (loss, per_level.clone()));
        let fusion = (0..levels)
            .map(|l| {
                let th = params[&format!("p{l}.fusion")].as_slice();
                let (a, b) = (th[0].as_f64(), th[1].as_f64());
                let m = a.max(b);
                let (ea, eb) = ((a - m).exp(), (b - m).exp());
                (ea / (ea + eb), eb / (ea + eb))
            })
            .collect();
        last = (loss, per_level, fusion);
        progress(step, loss);
        if step == opts.steps {
            break;
        }
        opt_params.step(&mut params, &eval.outputs, "grad.")?;
        opt_students.step(&mut students, &eval.outputs, "grad.")?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let (initial_loss, initial_level_losses) = first.expect("at least one step runs");
    let mut series = vec![Series {
        name: "total".into(),
        points: curves[0].clone(),
    }];
    for (l, name) in preset.level_names.iter().enumerate() {
        series.push(Series {
            name: name.clone(),
            points: curves[l + 1].clone(),
        });
    }
    let csv = opts.out_dir.join("loss.csv");
    let png = opts.out_dir.join("loss.png");
    write_csv(&csv, &series)?;
    write_png(
        &png,
        &format!("DMKD on synthetic FPN features ({} steps)", opts.steps),
        &series,
    )?;
    Ok(DemoReport {
        steps: opts.steps,
        level_names: preset.level_names.clone(),
        initial_loss,
        final_loss: last.0,
        initial_level_losses,
        final_level_losses: last.1,
        fusion_weights: last.2,
        seconds,
        csv,
        png,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output path that cannot be a directory fails before the first
    /// step (it used to fail after the whole run), naming the path.
    #[test]
    fn an_unusable_output_directory_fails_before_training() {
        let file = std::env::temp_dir().join(format!("dmkd-demo-out-{}", std::process::id()));
        std::fs::write(&file, b"not a directory").unwrap();
        let opts = DemoOptions {
            preset: Preset::named("tiny").unwrap(),
            steps: 2,
            out_dir: file.clone(),
            ..DemoOptions::default()
        };
        let mut steps = 0;
        let e = run_demo::<f64>(&opts, |_, _| steps += 1).unwrap_err();
        std::fs::remove_file(&file).ok();
        assert_eq!(e.kind(), "io", "{e}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        assert_eq!(steps, 0, "trained before checking the output directory");
    }
}
