//! CUDA timings (feature `cuda`), f32: conv3x3 256->256 forward, input
//! gradient and weight gradient on each RetinaNet level (N = 2), and the
//! whole DMKD loss forward + backward on the `retinanet` preset.
//!
//! Backend calls only queue work on the device, so every timed iteration
//! ends with `CudaBackend::synchronize()`: the host clock then measures the
//! device's work. Inputs are uploaded before timing (the device copy is
//! cached on each tensor) and the kernels compiled by `warm_up`. Throughput
//! is reported as elements/s where one element is one FLOP (2 per MAC).
//!
//! `cargo bench --features cuda --bench cuda`; without a device it prints
//! why and exits.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dmkd::backend::Backend;
use dmkd::backend::cuda::CudaBackend;
use dmkd::distill::evaluate;
use dmkd::ops::conv::conv_args;
use dmkd::rng::PhiloxStream;
use dmkd::synthetic::Preset;
use dmkd::{BackendRef, Conv2dOptions, Tensor};

fn rand(rng: &mut PhiloxStream, shape: &[usize], scale: f64) -> Tensor<f32> {
    Tensor::from_fn(shape, |_| (scale * rng.normal()) as f32).unwrap()
}

fn bench(c: &mut Criterion) {
    let cu = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipping the CUDA benches: {e}");
            return;
        }
    };
    cu.warm_up::<f32>().unwrap();
    eprintln!("device: {}", cu.device_name());
    let preset = Preset::named("retinanet").unwrap();
    let mut rng = PhiloxStream::new(1, 0);

    let mut group = c.benchmark_group("cuda_conv3x3_256");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    for (name, &(h, w)) in preset.level_names.iter().zip(&preset.levels) {
        let (n, ch) = (preset.n, preset.c);
        let x = rand(&mut rng, &[n, ch, h, w], 1.0);
        let wt = rand(&mut rng, &[ch, ch, 3, 3], 0.02);
        let b = rand(&mut rng, &[ch], 0.02);
        let args = conv_args(&x, &wt, Some(&b), &Conv2dOptions::same(1)).unwrap();
        // One untimed call uploads x, w and b and gives a device-resident dy.
        let dy = cu.conv2d(&x, &wt, Some(&b), &args).unwrap();
        cu.synchronize().unwrap();
        group.throughput(Throughput::Elements(2 * args.geom.macs()));
        group.bench_function(format!("{name}/forward"), |bch| {
            bch.iter(|| {
                let y = cu.conv2d(&x, &wt, Some(&b), &args).unwrap();
                cu.synchronize().unwrap();
                y
            })
        });
        group.bench_function(format!("{name}/input_grad"), |bch| {
            bch.iter(|| {
                let dx = cu.conv2d_backward_input(&dy, &wt, &args).unwrap();
                cu.synchronize().unwrap();
                dx
            })
        });
        group.bench_function(format!("{name}/weight_grad"), |bch| {
            bch.iter(|| {
                let dw = cu.conv2d_backward_weight(&dy, &x, &args).unwrap();
                cu.synchronize().unwrap();
                dw
            })
        });
    }
    group.finish();

    let problem = dmkd::synthetic::problem::<f32>(&preset, 0).unwrap();
    let backend: BackendRef<f32> = Arc::new(cu.clone());
    // Untimed: uploads every input and parameter once.
    evaluate(backend.clone(), &problem).unwrap();
    cu.synchronize().unwrap();
    let mut group = c.benchmark_group("cuda_dmkd_retinanet");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(2 * 12 * preset.conv3x3_macs()));
    group.bench_function("forward_backward", |bch| {
        bch.iter(|| {
            let e = evaluate(backend.clone(), &problem).unwrap();
            cu.synchronize().unwrap();
            e.loss
        })
    });
    group.finish();
}

// No plots: criterion's plotters backend needs system fonts this machine
// lacks, and panics without them.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
