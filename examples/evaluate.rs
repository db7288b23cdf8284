//! Using dmkd as a library: evaluate the DMKD loss on features you hold and
//! read its gradients.
//!
//! ```sh
//! cargo run --release --example evaluate
//! ```
//!
//! The features here come from `dmkd::synthetic` (the `tiny` preset: three
//! FPN levels, N = 2, 6 student and 8 teacher channels); in a training loop
//! they would be your student's and teacher's FPN outputs, under the
//! exchange-format names `p{l}.student` and `p{l}.teacher`.

use std::sync::Arc;

use dmkd::backend::CpuBackend;
use dmkd::distill::{Config, EvalOptions, Problem, evaluate};
use dmkd::synthetic::{Preset, inputs};
use dmkd::{BackendRef, ConvAlgo, TensorMap};

fn main() -> dmkd::Result<()> {
    // Inputs by exchange-format name: p0.student [2, 6, 7, 9], p0.teacher
    // [2, 8, 7, 9], and the same for levels 1 and 2.
    let preset = Preset::named("tiny")?;
    let tensors: TensorMap<f32> = inputs(&preset, 0)?;

    // One config object per level (docs/spec.md, "Exchange format"); here
    // level 1 draws its masks by Gumbel-top-k instead of top-k.
    let config = Config::from_json(
        r#"{"levels":[{"tau":0.5,"lambda_s":0.65,"lambda_c":0.65},{"mask_mode":"sampled","seed":7},{}]}"#,
    )?;

    // The parameters (align convs, generation blocks, fusion logits) are
    // not supplied, so they are initialised from a seed; pass them in
    // `tensors` under their names to use your own.
    let opts = EvalOptions {
        init_seed: Some(0),
        allow_extra: false,
    };
    let problem = Problem::new(&config, &tensors, opts)?;

    // The fast CPU backend; `ReferenceBackend` gives the same function with
    // plain loops, `CudaBackend` (feature `cuda`) on a GPU.
    let backend: BackendRef<f32> = Arc::new(CpuBackend::new(ConvAlgo::Auto));
    let result = evaluate(backend, &problem)?;

    println!("loss {:.6e}", result.loss);
    for (l, v) in result.level_losses.iter().enumerate() {
        println!("  level {l}: {v:.6e}");
    }
    // Every gradient is an output named `grad.<input or parameter>`.
    let g = &result.outputs["grad.p0.student"];
    let norm = g.as_slice().iter().map(|v| v * v).sum::<f32>().sqrt();
    println!("grad.p0.student: shape {:?}, norm {norm:.6e}", g.shape());
    let fusion = &result.outputs["grad.p0.fusion"];
    println!("grad.p0.fusion: {:?}", fusion.as_slice());
    // The masks and attention maps are outputs too.
    let mask = &result.outputs["p0.mask_s"];
    let masked = mask.as_slice().iter().filter(|&&m| m == 0.0).count();
    println!("p0.mask_s masks {masked} of {} positions", mask.numel());
    // The parameters used (here: initialised) are returned for an optimizer.
    println!("{} parameters", result.params.len());
    Ok(())
}
