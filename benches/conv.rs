//! conv3x3 256->256, N = 2, at the retinanet FPN levels (f32).
//!
//! - `cpu/{fwd,dx,dw}/P3..P7`: the CPU backend's three kernels (direct);
//! - `wino/{fwd,dx,dw}/P3..P7`: the same by Winograd F(4x4, 3x3);
//! - `mm_im2col/fwd/P4,P5`: the baseline, im2col + `matrixmultiply::sgemm`
//!   (its own thread pool, `MATMUL_NUM_THREADS`, default = cores up to 4);
//! - `reference/{fwd,dx,dw}/P6,P7`: the plain loops (slow: small levels only);
//! - `conv3x3_256_masked`, `{cpu,wino}/{fwd,dx,dw}_{spatial,channel}/P3,P4`:
//!   the first conv of a DMKD generator under the loss's own masks (`topk`
//!   at `lambda = 0.65` on the retinanet preset's synthetic teacher, as the
//!   whole loss draws them), where the kernels leave the masked work out.
//!
//! Throughput is reported in elements = multiply-adds of the pass
//! (2 FLOP each, the direct-conv model 9*N*H*W*Cin*Cout). Sample counts are
//! small so the whole bench runs in a few minutes:
//! `cargo bench --bench conv`.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dmkd::backend::{Backend, ConvArgs, ConvGeometry, CpuBackend, InputMask, ReferenceBackend};
use dmkd::synthetic::{Preset, loss_masks};
use dmkd::{ConvAlgo, Tensor};

const N: usize = 2;
const C: usize = 256;

struct Problem {
    x: Tensor<f32>,
    w: Tensor<f32>,
    b: Tensor<f32>,
    dy: Tensor<f32>,
    args: ConvArgs<f32>,
}

fn problem(h: usize, w: usize) -> Problem {
    let geom = ConvGeometry::new(&[N, C, h, w], &[C, C, 3, 3], [1, 1], [1, 1]).unwrap();
    let vals = |shape: &[usize], seed: usize| {
        Tensor::from_fn(shape, |i| {
            (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 1000.0
        })
        .unwrap()
    };
    Problem {
        x: vals(&geom.input_shape(), 1),
        w: vals(&geom.weight_shape(), 2),
        b: vals(&[C], 3),
        dy: vals(&geom.output_shape(), 4),
        args: ConvArgs {
            geom,
            mask: None,
            relu: true,
        },
    }
}

/// The baseline: per image, im2col (`[Cin*9, H*W]`) then one sgemm.
fn mm_im2col_forward(p: &Problem) -> Vec<f32> {
    let g = &p.args.geom;
    let (h, w) = (g.h, g.w);
    let hw = h * w;
    let k = C * 9;
    let mut col = vec![0.0f32; k * hw];
    let mut y = vec![0.0f32; N * C * hw];
    let xs = p.x.as_slice();
    for n in 0..N {
        for ci in 0..C {
            let plane = &xs[(n * C + ci) * hw..][..hw];
            for ky in 0..3 {
                for kx in 0..3 {
                    let row = &mut col[((ci * 3 + ky) * 3 + kx) * hw..][..hw];
                    for oy in 0..h {
                        let iy = oy as isize + ky as isize - 1;
                        for ox in 0..w {
                            let ix = ox as isize + kx as isize - 1;
                            row[oy * w + ox] =
                                if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                    plane[iy as usize * w + ix as usize]
                                } else {
                                    0.0
                                };
                        }
                    }
                }
            }
        }
        let yn = &mut y[n * C * hw..][..C * hw];
        // SAFETY: matrixmultiply's raw-pointer API; the shapes and row-major
        // strides below describe exactly the three buffers.
        unsafe {
            matrixmultiply::sgemm(
                C,
                k,
                hw,
                1.0,
                p.w.as_slice().as_ptr(),
                k as isize,
                1,
                col.as_ptr(),
                hw as isize,
                1,
                0.0,
                yn.as_mut_ptr(),
                hw as isize,
                1,
            );
        }
        let bs = p.b.as_slice();
        for (co, row) in yn.chunks_mut(hw).enumerate() {
            row.iter_mut().for_each(|v| *v = (*v + bs[co]).max(0.0));
        }
    }
    y
}

fn bench(c: &mut Criterion) {
    let cpu = CpuBackend::new(ConvAlgo::Direct);
    let wino = CpuBackend::new(ConvAlgo::Winograd);
    let reference = ReferenceBackend;
    // The level sizes of the retinanet preset (P3..P7), as `dmkd bench` uses.
    let preset = Preset::named("retinanet").unwrap();
    for (name, &(h, w)) in preset.level_names.iter().zip(&preset.levels) {
        let name = name.as_str();
        let p = problem(h, w);
        let macs = p.args.geom.macs();
        let mut g = c.benchmark_group("conv3x3_256");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Elements(macs));
        g.bench_function(BenchmarkId::new("cpu/fwd", name), |bch| {
            bch.iter(|| cpu.conv2d(&p.x, &p.w, Some(&p.b), &p.args).unwrap())
        });
        g.bench_function(BenchmarkId::new("cpu/dx", name), |bch| {
            bch.iter(|| cpu.conv2d_backward_input(&p.dy, &p.w, &p.args).unwrap())
        });
        g.bench_function(BenchmarkId::new("cpu/dw", name), |bch| {
            bch.iter(|| cpu.conv2d_backward_weight(&p.dy, &p.x, &p.args).unwrap())
        });
        g.bench_function(BenchmarkId::new("wino/fwd", name), |bch| {
            bch.iter(|| wino.conv2d(&p.x, &p.w, Some(&p.b), &p.args).unwrap())
        });
        g.bench_function(BenchmarkId::new("wino/dx", name), |bch| {
            bch.iter(|| wino.conv2d_backward_input(&p.dy, &p.w, &p.args).unwrap())
        });
        g.bench_function(BenchmarkId::new("wino/dw", name), |bch| {
            bch.iter(|| wino.conv2d_backward_weight(&p.dy, &p.x, &p.args).unwrap())
        });
        if name == "P4" || name == "P5" {
            g.bench_function(BenchmarkId::new("mm_im2col/fwd", name), |bch| {
                bch.iter(|| mm_im2col_forward(&p))
            });
        }
        if name == "P6" || name == "P7" {
            g.bench_function(BenchmarkId::new("reference/fwd", name), |bch| {
                bch.iter(|| reference.conv2d(&p.x, &p.w, Some(&p.b), &p.args).unwrap())
            });
            g.bench_function(BenchmarkId::new("reference/dx", name), |bch| {
                bch.iter(|| {
                    reference
                        .conv2d_backward_input(&p.dy, &p.w, &p.args)
                        .unwrap()
                })
            });
            g.bench_function(BenchmarkId::new("reference/dw", name), |bch| {
                bch.iter(|| {
                    reference
                        .conv2d_backward_weight(&p.dy, &p.x, &p.args)
                        .unwrap()
                })
            });
        }
        g.finish();
    }
}

fn bench_masked(c: &mut Criterion) {
    let preset = Preset::named("retinanet").unwrap();
    let algos = [
        ("cpu", CpuBackend::new(ConvAlgo::Direct)),
        ("wino", CpuBackend::new(ConvAlgo::Winograd)),
    ];
    for (level, (name, &(h, w))) in preset.level_names.iter().zip(&preset.levels).enumerate() {
        if name != "P3" && name != "P4" {
            continue;
        }
        let mut g = c.benchmark_group("conv3x3_256_masked");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        // The generator's first conv: masked input, ReLU after it.
        let mut p = problem(h, w);
        // The masks the loss draws at this level (N = 2, 256 channels: the
        // preset's own), from its synthetic teacher.
        let (ms, mc) = loss_masks::<f32>(&preset, level, 0).unwrap();
        for (kind, mask) in [
            ("spatial", InputMask::Spatial(ms)),
            ("channel", InputMask::Channel(mc)),
        ] {
            p.args.mask = Some(mask);
            g.throughput(Throughput::Elements(p.args.geom.macs()));
            for (algo, be) in &algos {
                g.bench_function(
                    BenchmarkId::new(format!("{algo}/fwd_{kind}"), name),
                    |bch| bch.iter(|| be.conv2d(&p.x, &p.w, Some(&p.b), &p.args).unwrap()),
                );
                g.bench_function(BenchmarkId::new(format!("{algo}/dx_{kind}"), name), |bch| {
                    bch.iter(|| be.conv2d_backward_input(&p.dy, &p.w, &p.args).unwrap())
                });
                g.bench_function(BenchmarkId::new(format!("{algo}/dw_{kind}"), name), |bch| {
                    bch.iter(|| be.conv2d_backward_weight(&p.dy, &p.x, &p.args).unwrap())
                });
            }
        }
        g.finish();
    }
}

// No plots: criterion's plotters backend needs system fonts this machine
// (and CI) lack, and panics without them; the numbers go to the terminal
// and target/criterion/*/estimates.json.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = bench, bench_masked
}
criterion_main!(benches);
