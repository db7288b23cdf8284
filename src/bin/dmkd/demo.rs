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

/// The fusion weights `softmax(theta)` of a level's two logits, `(w_s,
/// w_c)`, shifted by the larger logit so that no exponential overflows.
fn fusion_weights(a: f64, b: f64) -> (f64, f64) {
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    (ea / (ea + eb), eb / (ea + eb))
}

/// How many times a loss fell from `before` to `after`, for the demo's
/// table: one decimal up to 99999.9x, then in exponent form (the small
/// levels fall by 1e9 and more), so the column keeps its width.
pub fn fell(before: f64, after: f64) -> String {
    let r = before / after;
    if r.abs() < 1e5 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2e}x")
    }
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
                fusion_weights(th[0].as_f64(), th[1].as_f64())
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

    #[test]
    fn fell_keeps_to_the_column_width() {
        assert_eq!(fell(1.1072, 8.5715e-3), "129.2x");
        assert_eq!(fell(1.0, 1.0 / 99999.94), "99999.9x");
        assert_eq!(fell(1e5, 1.0), "1.00e5x");
        assert_eq!(fell(1.7608e-2, 1.3052e-11), "1.35e9x");
        assert_eq!(fell(1.0, 2.0), "0.5x");
        assert_eq!(fell(1.0, 0.0), "infx");
        assert_eq!(fell(0.0, 0.0), "NaNx");
        // Just under 1e5 rounds up to 100000.0x, still 9 characters.
        for (a, b) in [(1.0, 1e-300), (1e300, 1e-300), (1.0, 0.5), (1.0, 1e-5)] {
            assert!(fell(a, b).len() <= 9, "{}", fell(a, b));
        }
    }

    #[test]
    fn fusion_weights_are_the_softmax_of_the_two_logits() {
        let close = |a: (f64, f64), b: (f64, f64)| {
            assert!(
                (a.0 - b.0).abs() < 1e-15 && (a.1 - b.1).abs() < 1e-15,
                "{a:?} vs {b:?}"
            );
        };
        close(fusion_weights(0.0, 0.0), (0.5, 0.5));
        close(fusion_weights(0.0, 3f64.ln()), (0.25, 0.75));
        close(fusion_weights(3f64.ln(), 0.0), (0.75, 0.25));
        // Shifted by the larger logit: no overflow at 1000 (e^1000 is inf).
        let e = (-1f64).exp();
        close(
            fusion_weights(1000.0, 999.0),
            (1.0 / (1.0 + e), e / (1.0 + e)),
        );
        close(
            fusion_weights(-1000.0, -1001.0),
            (1.0 / (1.0 + e), e / (1.0 + e)),
        );
    }

    /// The report, the CSV and the level losses agree: the total is the sum
    /// of the levels, each CSV column is its series, and the fusion
    /// weights of every level sum to 1.
    #[test]
    fn a_demo_reports_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("dmkd-demo-report-{}", std::process::id()));
        let opts = DemoOptions {
            preset: Preset::named("tiny").unwrap(),
            steps: 3,
            out_dir: dir.clone(),
            ..DemoOptions::default()
        };
        let mut seen = Vec::new();
        let r = run_demo::<f64>(&opts, |step, loss| seen.push((step, loss))).unwrap();
        assert_eq!(r.steps, 3);
        assert_eq!(r.level_names, ["P3", "P4", "P5"]);
        assert_eq!(seen.len(), 4);
        assert_eq!((seen[0].1, seen[3].1), (r.initial_loss, r.final_loss));
        assert!(r.final_loss < r.initial_loss, "{r:?}");
        for (total, levels) in [
            (r.initial_loss, &r.initial_level_losses),
            (r.final_loss, &r.final_level_losses),
        ] {
            let sum: f64 = levels.iter().sum();
            assert!((sum - total).abs() <= 1e-12 * total, "{sum} vs {total}");
        }
        for &(ws, wc) in &r.fusion_weights {
            assert!(
                ws > 0.0 && wc > 0.0 && (ws + wc - 1.0).abs() < 1e-15,
                "{ws} {wc}"
            );
        }
        let csv = std::fs::read_to_string(&r.csv).unwrap();
        let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
        assert_eq!(rows[0], ["step", "total", "P3", "P4", "P5"]);
        let num = |s: &str| s.parse::<f64>().unwrap();
        let first: Vec<f64> = rows[1][1..].iter().map(|s| num(s)).collect();
        let last: Vec<f64> = rows[4][1..].iter().map(|s| num(s)).collect();
        assert_eq!((rows[1][0], rows[4][0]), ("0", "3"));
        assert_eq!(first[0], r.initial_loss);
        assert_eq!(&first[1..], &r.initial_level_losses[..]);
        assert_eq!(last[0], r.final_loss);
        assert_eq!(&last[1..], &r.final_level_losses[..]);
        assert!(std::fs::metadata(&r.png).unwrap().len() > 1000);
        std::fs::remove_dir_all(&dir).ok();
    }

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
