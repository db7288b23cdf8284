//! Rows of the table: files (safetensors, npy, npz, directories).

use super::*;

/// The rows about files.
pub(super) fn cases() -> Vec<(&'static str, Builder, &'static str)> {
    vec![
        // ---- safetensors
        (
            "empty safetensors",
            Box::new(|| unit(parse_safetensors(&[], "x"))),
            "format",
        ),
        (
            "safetensors cut in the header",
            Box::new(|| {
                let b = st_bytes(&small());
                unit(parse_safetensors(&b[..20], "x"))
            }),
            "format",
        ),
        (
            "safetensors cut in the data",
            Box::new(|| {
                let b = st_bytes(&small());
                unit(parse_safetensors(&b[..b.len() - 3], "x"))
            }),
            "format",
        ),
        (
            "safetensors header length u64::MAX",
            Box::new(|| unit(parse_safetensors(&[0xff; 64], "x"))),
            "format",
        ),
        (
            "safetensors header not JSON",
            Box::new(|| unit(parse_safetensors(&st_raw("{\"a\":", &[]), "x"))),
            "format",
        ),
        (
            "safetensors claiming 4 TB",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}"#,
                        &[0; 8],
                    ),
                    "x",
                ))
            }),
            "format",
        ),
        (
            "safetensors shape whose product overflows",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
                        &[],
                    ),
                    "x",
                ))
            }),
            "format",
        ),
        (
            "safetensors f16 tensor",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
                        &[0; 4],
                    ),
                    "x",
                ))
            }),
            "dtype",
        ),
        (
            "safetensors i64 tensor",
            Box::new(|| {
                unit(parse_safetensors(
                    &st_raw(
                        r#"{"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                        &[0; 8],
                    ),
                    "x",
                ))
            }),
            "dtype",
        ),
        (
            "file mixing f32 and f64",
            Box::new(|| {
                let mut f = TensorFile::default();
                f.tensors
                    .insert("a".into(), AnyTensor::F32(values(&[2], 0)));
                f.tensors
                    .insert("b".into(), AnyTensor::F64(values(&[2], 0)));
                f.dtype("x").map(|_| ())
            }),
            "dtype",
        ),
        // ---- npy
        (
            "empty npy",
            Box::new(|| parse_npy(&[], "x").map(|_| ())),
            "format",
        ),
        (
            "npy bad magic",
            Box::new(|| parse_npy(b"\x93NUMPZ\x01\x00\x00\x00", "x").map(|_| ())),
            "format",
        ),
        (
            "npy version 4",
            Box::new(|| {
                let mut b = npy_of(&[2]);
                b[6] = 4;
                parse_npy(&b, "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy cut in the header",
            Box::new(|| parse_npy(&npy_of(&[2, 3])[..40], "x").map(|_| ())),
            "format",
        ),
        (
            "npy cut in the data",
            Box::new(|| {
                let b = npy_of(&[2, 3]);
                parse_npy(&b[..b.len() - 1], "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy with trailing bytes",
            Box::new(|| {
                let mut b = npy_of(&[2, 3]);
                b.push(0);
                parse_npy(&b, "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy v2 header length 4 GB",
            Box::new(|| parse_npy(b"\x93NUMPY\x02\x00\xff\xff\xff\xff{}", "x").map(|_| ())),
            "format",
        ),
        (
            "npy shape 2^32 x 2^32 x 2^32",
            Box::new(|| {
                parse_npy(&npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", &[0; 4]), "x").map(|_| ())
            }),
            "too_large",
        ),
        (
            "npy dimension over u64",
            Box::new(|| {
                parse_npy(&npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551616,), }", &[0; 4]), "x").map(|_| ())
            }),
            "format",
        ),
        (
            "npy claiming 4 GB in a 100-byte file",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy big-endian f4",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy float16",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy int32",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy structured dtype",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                        &[0; 4],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "dtype",
        ),
        (
            "npy Fortran order 2x2",
            Box::new(|| {
                parse_npy(
                    &npy_raw(
                        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                        &[0; 16],
                    ),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy header without shape",
            Box::new(|| {
                parse_npy(
                    &npy_raw("{'descr': '<f4', 'fortran_order': False, }", &[0; 4]),
                    "x",
                )
                .map(|_| ())
            }),
            "format",
        ),
        (
            "npy header not a dict",
            Box::new(|| parse_npy(&npy_raw("__import__('os')", &[0; 4]), "x").map(|_| ())),
            "format",
        ),
        // ---- npz
        (
            "npz cut in half",
            Box::new(|| {
                let b = npz(&[("a.npy", npy_of(&[3]))], false);
                unit(parse_npz(&b[..b.len() / 2], "x", 1 << 20))
            }),
            "format",
        ),
        (
            "npz central directory corrupt",
            Box::new(|| {
                let mut b = npz(&[("a.npy", npy_of(&[3]))], false);
                let n = b.len();
                b[n - 10] ^= 0xff;
                b[n - 6] ^= 0xff;
                unit(parse_npz(&b, "x", 1 << 20))
            }),
            "format",
        ),
        (
            "npz member that is not .npy",
            Box::new(|| {
                unit(parse_npz(
                    &npz(&[("a.txt", b"hello".to_vec())], false),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "npz member that is big-endian",
            Box::new(|| {
                unit(parse_npz(
                    &npz(
                        &[(
                            "a.npy",
                            npy_raw(
                                "{'descr': '>f8', 'fortran_order': False, 'shape': (1,), }",
                                &[0; 8],
                            ),
                        )],
                        true,
                    ),
                    "x",
                    1 << 20,
                ))
            }),
            "dtype",
        ),
        (
            "npz member cut short",
            Box::new(|| {
                let b = npy_of(&[4, 4]);
                unit(parse_npz(
                    &npz(&[("a.npy", b[..b.len() - 4].to_vec())], true),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "npz inflating past its budget",
            Box::new(|| {
                unit(parse_npz(
                    &npz(
                        &[(
                            "a.npy",
                            npy_bytes(&Tensor::<f64>::zeros(&[512, 512]).unwrap()).unwrap(),
                        )],
                        true,
                    ),
                    "x",
                    1 << 20,
                ))
            }),
            "too_large",
        ),
        (
            "npz with bad metadata.json",
            Box::new(|| {
                unit(parse_npz(
                    &npz(&[("metadata.json", b"{\"config\": 3}".to_vec())], false),
                    "x",
                    1 << 20,
                ))
            }),
            "format",
        ),
        (
            "bytes neither npy nor npz",
            Box::new(|| unit(parse_npy_or_npz(b"GIF89a", "x", "x", 1 << 20))),
            "format",
        ),
        // ---- files and directories
        (
            "inputs file does not exist",
            Box::new(|| {
                unit(read_tensor_file(Path::new(
                    "/nonexistent/dmkd/in.safetensors",
                )))
            }),
            "io",
        ),
        (
            "directory without .npy files",
            Box::new(|| unit(read_tensor_file(&tmp("empty-dir")))),
            "format",
        ),
        (
            "directory whose metadata.json is not JSON",
            Box::new(|| {
                let d = tmp("bad-meta");
                std::fs::write(d.join("a.npy"), npy_of(&[2])).unwrap();
                std::fs::write(d.join("metadata.json"), "config = 1").unwrap();
                unit(read_tensor_file(&d))
            }),
            "format",
        ),
        (
            "a tensor name that is a path",
            Box::new(|| {
                let m: TensorMap<f64> = [("../evil".to_string(), values(&[1], 0))].into();
                write_npy_dir(&tmp("evil"), &m, &HashMap::new())
            }),
            "format",
        ),
    ]
}
