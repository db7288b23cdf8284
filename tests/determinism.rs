//! Bit-determinism of the CPU backend across thread counts, instruction
//! sets and runs.
//!
//! Every kernel must give the same bits under 1, 2, 7 and 8 rayon threads
//! (more threads than this machine has cores, so work lands on threads in
//! a different pattern), on every instruction set this CPU has (`Isa`:
//! AVX-512, AVX2, scalar; a machine without AVX-512 runs the other two),
//! and again on a second run. The shapes
//! are medium-sized so that the parallel paths are taken: several position
//! chunks and weight-gradient row tasks, reductions longer than one fixed
//! chunk.

use std::sync::Arc;

use crate::common;

use common::fill;

use dmkd::backend::{Backend, Binary, ConvArgs, ConvGeometry, CpuBackend, Isa, Unary};
use dmkd::{ConvAlgo, Float, InputMask, Tensor};

/// The bits of every output of every kernel, in a fixed order.
fn all_outputs<T: Float>(isa: Isa) -> Vec<Vec<u64>>
where
    CpuBackend: Backend<T>,
{
    let be = CpuBackend::with_isa(ConvAlgo::Direct, isa).unwrap();
    let wino = CpuBackend::with_isa(ConvAlgo::Winograd, isa).unwrap();
    let wino6 = CpuBackend::with_isa(ConvAlgo::Winograd6, isa).unwrap();
    let bits = |t: Tensor<T>| t.as_slice().iter().map(|v| v.as_f64().to_bits()).collect();
    let mut out: Vec<Vec<u64>> = Vec::new();

    let (n, c, h, w) = (2, 64, 20, 24);
    let x = fill::<T>(&[n, c, h, w], 1);
    let dy = fill::<T>(&[n, c, h, w], 2);
    let mask_s =
        Tensor::from_fn(&[n, h, w], |i| T::from_f64(((i * 7) % 3 != 0) as u8 as f64)).unwrap();
    let mask_c = fill::<T>(&[n, c], 3);
    // A masked blob of rows: the skipped output tiles.
    let mask_blob = Tensor::from_fn(&[n, h, w], |i| {
        T::from_f64(((i % (h * w)) / w >= 12) as u8 as f64)
    })
    .unwrap();
    // 0/1 channels: the channel-sparse paths.
    let mask_c01 =
        Tensor::from_fn(&[n, c], |i| T::from_f64(((i * 5) % 3 == 0) as u8 as f64)).unwrap();
    for (kh, pad, cin, mask) in [
        (3, 1, c, Some(InputMask::Spatial(mask_s.clone()))),
        (3, 1, c, Some(InputMask::Channel(mask_c.clone()))),
        (3, 1, c, Some(InputMask::Channel(mask_c01))),
        (3, 1, c, Some(InputMask::Spatial(mask_blob))),
        (1, 0, 48, None),
    ] {
        let xin = if cin == c {
            x.clone()
        } else {
            fill::<T>(&[n, cin, h, w], 4)
        };
        let wt = fill::<T>(&[c, cin, kh, kh], 5);
        let b = fill::<T>(&[c], 6);
        let geom = ConvGeometry::new(xin.shape(), wt.shape(), [1, 1], [pad, pad]).unwrap();
        let args = ConvArgs {
            geom,
            mask,
            relu: true,
        };
        out.push(bits(be.conv2d(&xin, &wt, Some(&b), &args).unwrap()));
        out.push(bits(be.conv2d_backward_input(&dy, &wt, &args).unwrap()));
        out.push(bits(be.conv2d_backward_weight(&dy, &xin, &args).unwrap()));
        // Winograd (3x3 cases; the 1x1 one runs direct): its tile-row
        // tasks depend on the thread count.
        out.push(bits(wino.conv2d(&xin, &wt, Some(&b), &args).unwrap()));
        out.push(bits(wino.conv2d_backward_input(&dy, &wt, &args).unwrap()));
        out.push(bits(wino.conv2d_backward_weight(&dy, &xin, &args).unwrap()));
        // And F(6x6) (its weight gradient is F(4x4)'s, above).
        out.push(bits(wino6.conv2d(&xin, &wt, Some(&b), &args).unwrap()));
        out.push(bits(wino6.conv2d_backward_input(&dy, &wt, &args).unwrap()));
    }
    // Winograd's weight gradient over several 256-tile blocks (2 x 10 x 18
    // tiles), with a spatial mask that drops some tiles.
    {
        let (h2, w2) = (40, 72);
        let x2 = fill::<T>(&[n, c, h2, w2], 8);
        let dy2 = fill::<T>(&[n, c, h2, w2], 9);
        let wt = fill::<T>(&[c, c, 3, 3], 10);
        let geom = ConvGeometry::new(x2.shape(), wt.shape(), [1, 1], [1, 1]).unwrap();
        let blob = Tensor::from_fn(&[n, h2, w2], |i| {
            T::from_f64(((i % (h2 * w2)) / w2 >= 17) as u8 as f64)
        })
        .unwrap();
        for mask in [None, Some(InputMask::Spatial(blob))] {
            let args = ConvArgs {
                geom,
                mask,
                relu: false,
            };
            out.push(bits(wino.conv2d(&x2, &wt, None, &args).unwrap()));
            out.push(bits(wino.conv2d_backward_weight(&dy2, &x2, &args).unwrap()));
        }
    }
    out.push(bits(be.conv2d_backward_bias(&dy).unwrap()));

    let y = be.unary(Unary::Exp, &x).unwrap();
    out.push(bits(y.clone()));
    out.push(bits(be.unary_backward(Unary::Exp, &x, &y, &dy).unwrap()));
    let bc = fill::<T>(&[1, c, 1, w], 7);
    out.push(bits(be.binary(Binary::Mul, &x, &bc, x.shape()).unwrap()));
    out.push(bits(be.broadcast_to(&bc, x.shape()).unwrap()));
    out.push(bits(be.mask_mul(&x, &InputMask::Spatial(mask_s)).unwrap()));
    for axes in [
        vec![0, 1, 2, 3],
        vec![0, 2, 3],
        vec![1],
        vec![2, 3],
        vec![0],
    ] {
        out.push(bits(be.sum_axes(&x, &axes).unwrap()));
    }
    let flat = x.reshape(&[n, c, h * w]).unwrap();
    out.push(bits(be.softmax(&flat, 2).unwrap()));
    out.push(bits(be.softmax(&flat, 1).unwrap()));
    let s = be.softmax(&flat, 2).unwrap();
    let g = dy.reshape(&[n, c, h * w]).unwrap();
    out.push(bits(be.softmax_backward(&s, &g, 2).unwrap()));
    out.push(bits(be.sq_err_sum(&x, &dy).unwrap()));
    out.push(bits(be.sq_err_backward(&x, &dy, T::from_f64(0.3)).unwrap()));
    out.push(bits(be.narrow(&x, 1, 5, 20).unwrap()));
    out
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// The runs compared with one thread on the widest instruction set: that
/// ISA under other thread counts (and a second run), then every narrower
/// ISA this CPU has.
fn runs() -> Vec<(usize, Isa)> {
    let isas = Isa::available();
    let mut v: Vec<(usize, Isa)> = [2, 7, 8, 1].iter().map(|&t| (t, isas[0])).collect();
    v.extend(isas[1..].iter().map(|&isa| (2, isa)));
    v
}

fn check<T: Float>()
where
    CpuBackend: Backend<T>,
{
    let widest = Isa::available()[0];
    let base = in_pool(1, || all_outputs::<T>(widest));
    for (threads, isa) in runs() {
        let got = in_pool(threads, || all_outputs::<T>(isa));
        assert_eq!(got.len(), base.len());
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            assert!(
                g == b,
                "{}: output {i} differs with {threads} threads on {isa} (base: 1 thread on {widest})",
                T::DTYPE
            );
        }
    }
}

#[test]
fn same_bits_for_every_thread_count_and_isa_f32() {
    check::<f32>();
}

#[test]
fn same_bits_for_every_thread_count_and_isa_f64() {
    check::<f64>();
}

/// The whole DMKD loss (and MGD on one level, FGD on another) forward and
/// backward: every output (loss, per-level losses, every gradient, masks)
/// has the same bits under 1, 2, 7 and 8 threads and on every instruction
/// set, direct and Winograd, at a size where the kernels split their work.
#[test]
fn whole_loss_same_bits_for_every_thread_count_and_isa() {
    use dmkd::distill::{Config, EvalOptions, LevelConfig, MaskMode, Method, Problem, evaluate};
    use dmkd::synthetic::{Preset, inputs};
    let preset = Preset::named("demo").unwrap().with_channels(48, 40);
    let mut config = preset.config();
    config.levels[1].mask_mode = MaskMode::Sampled;
    config.levels[2].method = Method::Mgd;
    config.levels[3] = LevelConfig {
        mask_mode: MaskMode::Random,
        lambda_c: 0.15,
        ..config.levels[3].clone()
    };
    // The last level is FGD (it needs boxes: two on image 0, one on image 1).
    config.levels[4].method = Method::Fgd;
    let config = Config {
        levels: config.levels,
    };
    let mut inputs64 = inputs::<f64>(&preset, 1).unwrap();
    let t = |shape: &[usize], v: &[f64]| dmkd::Tensor::from_vec(shape, v.to_vec()).unwrap();
    inputs64.insert(
        "gt_boxes.0".into(),
        t(
            &[2, 4],
            &[10.0, 20.0, 200.0, 150.0, 50.0, 60.0, 120.0, 300.0],
        ),
    );
    inputs64.insert("gt_boxes.1".into(), t(&[1, 4], &[0.0, 0.0, 90.5, 70.25]));
    inputs64.insert(
        "img_shape".into(),
        t(&[2, 2], &[250.0, 380.0, 200.0, 300.0]),
    );
    let inputs32: dmkd::distill::TensorMap<f32> = inputs64
        .iter()
        .map(|(k, v)| (k.clone(), v.cast()))
        .collect();
    for dtype_f64 in [false, true] {
        for algo in [
            ConvAlgo::Auto,
            ConvAlgo::Direct,
            ConvAlgo::Winograd,
            ConvAlgo::Winograd6,
        ] {
            let run = |threads: usize, isa: Isa| -> Vec<(String, Vec<u64>)> {
                in_pool(threads, || {
                    let opts = EvalOptions {
                        init_seed: Some(5),
                        allow_extra: false,
                    };
                    let bits = |m: &dmkd::distill::TensorMap<f64>| {
                        m.iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    v.as_slice().iter().map(|x| x.to_bits()).collect(),
                                )
                            })
                            .collect()
                    };
                    if dtype_f64 {
                        let p = Problem::new(&config, &inputs64, opts).unwrap();
                        let e = evaluate(Arc::new(CpuBackend::with_isa(algo, isa).unwrap()), &p)
                            .unwrap();
                        bits(&e.outputs)
                    } else {
                        let p = Problem::new(&config, &inputs32, opts).unwrap();
                        let e = evaluate(Arc::new(CpuBackend::with_isa(algo, isa).unwrap()), &p)
                            .unwrap();
                        let as64: dmkd::distill::TensorMap<f64> = e
                            .outputs
                            .iter()
                            .map(|(k, v)| (k.clone(), v.cast()))
                            .collect();
                        bits(&as64)
                    }
                })
            };
            let widest = Isa::available()[0];
            let one = run(1, widest);
            assert!(one.len() > 40, "every output is compared");
            // The FGD level ran (its GcBlock parameters have gradients).
            assert!(
                one.iter()
                    .any(|(k, _)| k.starts_with("grad.p4.channel_add_conv_")),
                "the FGD level's gradients are compared"
            );
            // Auto (the default) under every thread count; each algorithm on
            // every instruction set.
            let others = match algo {
                ConvAlgo::Auto => runs(),
                _ => runs().into_iter().filter(|r| r.0 == 2).collect(),
            };
            for (threads, isa) in others {
                let other = run(threads, isa);
                assert_eq!(
                    one.len(),
                    other.len(),
                    "same outputs under {threads} threads on {isa}"
                );
                for ((k, a), (_, b)) in one.iter().zip(&other) {
                    assert!(
                        a == b,
                        "{k} differs between 1 thread on {widest} and {threads} on {isa} \
                     (f64: {dtype_f64}, {algo:?})"
                    );
                }
            }
        }
    }
}
