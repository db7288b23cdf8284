//! The inputs of a level in the exchange format (`docs/spec.md`): their
//! names, and reading and checking them from named tensors.

use super::fgd::Boxes;
use super::{LevelConfig, LevelShape, Method, ParamSpec, dmkd, fgd, mgd};
use crate::error::{Error, Result};
use crate::named::TensorMap;
use crate::tensor::Float;

/// The exchange-format name of a level's student feature, `p{l}.student`.
pub fn student_name(level: usize) -> String {
    format!("p{level}.student")
}
/// The exchange-format name of a level's teacher feature, `p{l}.teacher`.
pub fn teacher_name(level: usize) -> String {
    format!("p{level}.teacher")
}

/// The exchange-format name of image `i`'s FGD boxes, `gt_boxes.{i}`.
pub fn box_name(image: usize) -> String {
    format!("gt_boxes.{image}")
}

/// Is `name` the boxes of one of the batch's `n` images? Boxes of an image
/// past the batch (a rank given the whole batch's boxes with its shard of
/// features) are not, so they are refused as unexpected, not ignored.
pub fn is_box_name(name: &str, n: usize) -> bool {
    name.strip_prefix("gt_boxes.")
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i < n && box_name(i) == name)
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
        let name = box_name(i);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn box_names_are_those_of_the_batch_only() {
        assert_eq!(box_name(3), "gt_boxes.3");
        assert!(is_box_name("gt_boxes.0", 2) && is_box_name("gt_boxes.1", 2));
        for name in [
            "gt_boxes.2",
            "gt_boxes.01",
            "gt_boxes.+1",
            "gt_boxes.",
            "gt_boxes.x",
            "boxes.0",
        ] {
            assert!(!is_box_name(name, 2), "{name}");
        }
        assert!(!is_box_name("gt_boxes.0", 0));
    }

    #[test]
    fn boxes_are_read_per_image_with_height_then_width() {
        // Two images of different, non-square sizes: a height and width read
        // from the wrong slots, or image 1 read as image 0, changes them.
        let map: TensorMap<f32> = TensorMap::from([
            (
                "img_shape".to_string(),
                Tensor::from_vec(&[2, 2], vec![30.0, 40.0, 50.0, 60.0]).unwrap(),
            ),
            (
                "gt_boxes.0".to_string(),
                Tensor::from_vec(&[1, 4], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
            ),
            (
                "gt_boxes.1".to_string(),
                Tensor::from_vec(&[2, 4], vec![0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap(),
            ),
        ]);
        let b = read_boxes(&map, 2).unwrap();
        assert_eq!(b.img_shape, vec![[30.0, 40.0], [50.0, 60.0]]);
        assert_eq!(b.per_image[0], vec![[1.0, 2.0, 3.0, 4.0]]);
        assert_eq!(
            b.per_image[1],
            vec![[0.0, 0.0, 5.0, 6.0], [7.0, 8.0, 9.0, 10.0]]
        );
    }
}
