//! Rows of the table: problems built from named tensors and configs
//! (presence and names, shapes, values, FGD boxes, sizes refused before
//! allocating, configs).

use super::*;

/// The rows about problem inputs.
pub(super) fn cases() -> Vec<(&'static str, Builder, &'static str)> {
    let nan_at = |name: &'static str, i: usize, v: f64| {
        with(small(), move |m| {
            let t = &m[name];
            let mut d = t.to_vec();
            d[i] = v;
            let shape = t.shape().to_vec();
            set(m, name, &shape, d);
        })
    };
    vec![
        // ---- named tensors: presence
        (
            "teacher missing",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        m.remove("p0.teacher");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "student missing",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        m.remove("p0.student");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "second level absent from the inputs",
            Box::new(|| run(&cfg(r#"{"levels":[{},{}]}"#), &small(), INIT)),
            "missing_tensor",
        ),
        (
            "parameter missing and no init seed",
            Box::new(|| run(&dmkd1(), &small(), NO_INIT)),
            "missing_tensor",
        ),
        (
            "a level's features beyond the config, extra tensors allowed",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        let (s, t) = (m["p0.student"].clone(), m["p0.teacher"].clone());
                        m.insert("p1.student".into(), s);
                        m.insert("p1.teacher".into(), t);
                    }),
                    EvalOptions {
                        allow_extra: true,
                        ..INIT
                    },
                )
            }),
            "invalid_argument",
        ),
        (
            "misspelt input name",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        let t = m["p0.student"].clone();
                        m.insert("p0.studnet".into(), t);
                    }),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "misspelt parameter name",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "p0.fusoin", &[2], vec![0.0, 0.0])),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "fgd boxes given to a dmkd level",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "img_shape", &[2, 2], vec![1.0; 4])),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        // ---- shapes
        (
            "student of rank 3",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.student", &[2, 3, 15], vec![0.5; 90])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "teacher of rank 5",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 3, 5, 1], vec![0.5; 120])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "student and teacher differ in N",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[1, 4, 3, 5], vec![0.5; 60])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "student and teacher differ in H",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 2, 5], vec![0.5; 80])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "student and teacher differ in W",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.teacher", &[2, 4, 3, 4], vec![0.5; 96])
                    }),
                    INIT,
                )
            }),
            "shape_mismatch",
        ),
        (
            "levels differ in batch",
            Box::new(|| {
                let mut m = small();
                m.extend(
                    inputs::<f64>(2, 1, 3, 4, 2, 2)
                        .into_iter()
                        .filter(|(k, _)| k.starts_with("p1.")),
                );
                run(&cfg(r#"{"levels":[{},{}]}"#), &m, INIT)
            }),
            "shape_mismatch",
        ),
        (
            "zero batch",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 0, 3, 4, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero height",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 3, 4, 0, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero student channels",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 0, 4, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "zero teacher channels",
            Box::new(|| run(&dmkd1(), &inputs::<f64>(1, 2, 3, 0, 3, 5), INIT)),
            "zero_sized",
        ),
        (
            "parameter of the wrong shape",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| set(m, "p0.fusion", &[3], vec![0.0; 3])),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "align weight transposed",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.align.weight", &[3, 4, 1, 1], vec![0.1; 12])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        // ---- values
        (
            "NaN in a student",
            Box::new(move || run(&dmkd1(), &nan_at("p0.student", 17, f64::NAN), INIT)),
            "non_finite",
        ),
        (
            "+Inf in a teacher",
            Box::new(move || run(&dmkd1(), &nan_at("p0.teacher", 0, f64::INFINITY), INIT)),
            "non_finite",
        ),
        (
            "-Inf in a parameter",
            Box::new(|| {
                run(
                    &dmkd1(),
                    &with(small(), |m| {
                        set(m, "p0.fusion", &[2], vec![0.0, f64::NEG_INFINITY])
                    }),
                    INIT,
                )
            }),
            "non_finite",
        ),
        (
            "finite f32 inputs whose squares overflow",
            Box::new(|| {
                let m: TensorMap<f32> =
                    small_t::<f32>()
                        .into_iter()
                        .map(|(k, t)| {
                            let big = Tensor::from_fn(t.shape(), |i| {
                                if i % 2 == 0 { 3e37f32 } else { -3e37 }
                            })
                            .unwrap();
                            (k, big)
                        })
                        .collect();
                run(&dmkd1(), &m, INIT)
            }),
            "non_finite",
        ),
        // ---- FGD boxes
        (
            "fgd without img_shape",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        m.remove("img_shape");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "fgd without the boxes of image 1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        m.remove("gt_boxes.1");
                    }),
                    INIT,
                )
            }),
            "missing_tensor",
        ),
        (
            "fgd img_shape of the wrong shape",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "img_shape", &[2, 3], vec![30.0; 6])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd boxes of an image past the batch (N = 2)",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.2", &[1, 4], vec![1.0, 2.0, 3.0, 4.0])
                    }),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "fgd boxes under a non-canonical index",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.01", &[1, 4], vec![1.0, 2.0, 3.0, 4.0])
                    }),
                    INIT,
                )
            }),
            "unexpected_tensor",
        ),
        (
            "fgd boxes of width 5",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 5], vec![1.0; 5])
                    }),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd boxes of rank 1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| set(m, "gt_boxes.0", &[4], vec![1.0; 4])),
                    INIT,
                )
            }),
            "tensor_shape",
        ),
        (
            "fgd box with x2 < x1",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 4], vec![20.0, 2.0, 1.0, 25.0])
                    }),
                    INIT,
                )
            }),
            "invalid_argument",
        ),
        (
            "fgd box with NaN",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "gt_boxes.0", &[1, 4], vec![1.0, f64::NAN, 20.0, 25.0])
                    }),
                    INIT,
                )
            }),
            "non_finite",
        ),
        (
            "fgd image of height 0",
            Box::new(|| {
                run(
                    &fgd1(),
                    &with(fgd_inputs(), |m| {
                        set(m, "img_shape", &[2, 2], vec![0.0, 50.0, 30.0, 50.0])
                    }),
                    INIT,
                )
            }),
            "invalid_argument",
        ),
        // ---- sizes: refused before allocating
        (
            "80 KB teacher implying 230 GB of generator weights",
            Box::new(|| run(&dmkd1(), &inputs::<f32>(1, 1, 1, 40_000, 1, 1), INIT)),
            "too_large",
        ),
        // ---- config
        (
            "tau = 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":0}]}"#)),
            "config",
        ),
        (
            "tau < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":-0.5}]}"#)),
            "config",
        ),
        (
            "lambda_s = 1",
            Box::new(|| unit_cfg(r#"{"levels":[{"lambda_s":1.0}]}"#)),
            "config",
        ),
        (
            "lambda_c < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"lambda_c":-0.01}]}"#)),
            "config",
        ),
        (
            "alpha < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"alpha":-2e-5}]}"#)),
            "config",
        ),
        (
            "beta_fgd < 0",
            Box::new(|| unit_cfg(r#"{"levels":[{"beta_fgd":-1}]}"#)),
            "config",
        ),
        (
            "tau out of f64 range",
            Box::new(|| unit_cfg(r#"{"levels":[{"tau":1e999}]}"#)),
            "config",
        ),
        (
            "unknown key",
            Box::new(|| unit_cfg(r#"{"levels":[{"lamda_s":0.5}]}"#)),
            "config",
        ),
        (
            "unknown top-level key",
            Box::new(|| unit_cfg(r#"{"levels":[{}],"level":[]}"#)),
            "config",
        ),
        (
            "unknown method",
            Box::new(|| unit_cfg(r#"{"levels":[{"method":"kd"}]}"#)),
            "config",
        ),
        (
            "seed not an integer",
            Box::new(|| unit_cfg(r#"{"levels":[{"seed":1.5}]}"#)),
            "config",
        ),
        (
            "no levels",
            Box::new(|| unit_cfg(r#"{"levels":[]}"#)),
            "config",
        ),
        (
            "65 levels",
            Box::new(|| unit_cfg(&format!(r#"{{"levels":[{}{{}}]}}"#, "{},".repeat(64)))),
            "config",
        ),
        (
            "not JSON",
            Box::new(|| unit_cfg("levels: [tau: 0.5]")),
            "config",
        ),
        (
            "JSON nested 10,000 deep",
            Box::new(|| unit_cfg(&"[".repeat(10_000))),
            "config",
        ),
        (
            "config over 1 MiB",
            Box::new(|| unit_cfg(&format!(r#"{{"levels":[{{}}]}}{}"#, " ".repeat(1 << 20)))),
            "config",
        ),
    ]
}
