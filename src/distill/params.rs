//! Parameters: names in the exchange format, shapes, and seeded initialisation.

use std::collections::BTreeMap;

use crate::autograd::Var;
use crate::error::{Error, Result};
use crate::rng::PhiloxStream;
use crate::tensor::{Float, Tensor};

/// How a parameter starts when the user supplies none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// PyTorch's default conv weight init, `kaiming_uniform_(a = sqrt(5))`:
    /// U(-b, b) with `b = 1 / sqrt(fan_in)`.
    KaimingUniform {
        /// Inputs per output (`Cin * kh * kw`).
        fan_in: usize,
    },
    /// PyTorch's default conv bias init: U(-b, b), `b = 1 / sqrt(fan_in)`.
    BiasUniform {
        /// Inputs per output.
        fan_in: usize,
    },
    /// `kaiming_normal_(mode = fan_in, relu)`: N(0, 2 / fan_in) (FGD's context conv).
    KaimingNormal {
        /// Inputs per output.
        fan_in: usize,
    },
    /// All zeros (biases of FGD, the fusion logits).
    Zeros,
    /// All ones (LayerNorm scales).
    Ones,
}

/// One parameter a level expects.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Exchange-format name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initialisation when absent.
    pub init: Init,
}

impl ParamSpec {
    /// A spec from its parts.
    pub fn new(name: String, shape: &[usize], init: Init) -> Self {
        ParamSpec {
            name,
            shape: shape.to_vec(),
            init,
        }
    }
}

/// The weight and bias specs of a conv named `prefix` (PyTorch's default init).
pub fn conv_specs(prefix: &str, c_out: usize, c_in: usize, k: usize) -> [ParamSpec; 2] {
    let fan_in = c_in * k * k;
    [
        ParamSpec::new(
            format!("{prefix}.weight"),
            &[c_out, c_in, k, k],
            Init::KaimingUniform { fan_in },
        ),
        ParamSpec::new(
            format!("{prefix}.bias"),
            &[c_out],
            Init::BiasUniform { fan_in },
        ),
    ]
}

/// A stable 32-bit stream id from a parameter name (FNV-1a), so each
/// parameter's initial values depend only on the seed and its name.
fn stream_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// Initial values of one parameter.
pub fn init_tensor<T: Float>(spec: &ParamSpec, seed: u64) -> Result<Tensor<T>> {
    let mut rng = PhiloxStream::new(seed, stream_id(&spec.name));
    match spec.init {
        Init::KaimingUniform { fan_in } | Init::BiasUniform { fan_in } => {
            let b = 1.0 / (fan_in.max(1) as f64).sqrt();
            Tensor::from_fn(&spec.shape, |_| T::from_f64(rng.uniform(-b, b)))
        }
        Init::KaimingNormal { fan_in } => {
            let std = (2.0 / fan_in.max(1) as f64).sqrt();
            Tensor::from_fn(&spec.shape, |_| T::from_f64(std * rng.normal()))
        }
        Init::Zeros => Tensor::zeros(&spec.shape),
        Init::Ones => Tensor::ones(&spec.shape),
    }
}

/// Check a supplied parameter against its spec.
pub fn check_param<T: Float>(spec: &ParamSpec, t: &Tensor<T>) -> Result<()> {
    if t.shape() != spec.shape.as_slice() {
        return Err(Error::TensorShape {
            name: spec.name.clone(),
            expected: spec.shape.clone(),
            got: t.shape().to_vec(),
        });
    }
    t.check_finite(&spec.name)
}

/// The parameter variables of one level, looked up by their name suffix.
pub struct LevelVars<T: Float> {
    /// The level index `l` of `p{l}.*`.
    pub level: usize,
    vars: BTreeMap<String, Var<T>>,
}

impl<T: Float> LevelVars<T> {
    /// The variables of level `level`, by full name.
    pub fn from_vars(level: usize, vars: BTreeMap<String, Var<T>>) -> Self {
        LevelVars { level, vars }
    }

    /// The variable `p{level}.{suffix}`.
    pub fn get(&self, suffix: &str) -> Result<&Var<T>> {
        let name = format!("p{}.{suffix}", self.level);
        self.vars.get(&name).ok_or(Error::MissingTensor(name))
    }

    /// True when `p{level}.{suffix}` is present.
    pub fn has(&self, suffix: &str) -> bool {
        self.vars.contains_key(&format!("p{}.{suffix}", self.level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_per_name_and_in_range() {
        let [w, b] = conv_specs("p0.gen_s.0", 4, 3, 3);
        let a: Tensor<f64> = init_tensor(&w, 5).unwrap();
        let again: Tensor<f64> = init_tensor(&w, 5).unwrap();
        let other_seed: Tensor<f64> = init_tensor(&w, 6).unwrap();
        let bias: Tensor<f64> = init_tensor(&b, 5).unwrap();
        assert_eq!(a.as_slice(), again.as_slice());
        assert_ne!(a.as_slice(), other_seed.as_slice());
        let bound = 1.0 / 27f64.sqrt();
        assert!(a.as_slice().iter().all(|v| v.abs() <= bound));
        assert!(bias.as_slice().iter().all(|v| v.abs() <= bound));
        // Spread: a uniform on [-b, b] has standard deviation b / sqrt(3).
        let var = a.as_slice().iter().map(|v| v * v).sum::<f64>() / a.numel() as f64;
        assert!((var.sqrt() - bound / 3f64.sqrt()).abs() < 0.25 * bound);
    }

    #[test]
    fn each_name_draws_its_own_values() {
        // FNV-1a of the empty string and of "a" (published test vectors).
        assert_eq!(stream_id(""), 0x811c9dc5);
        assert_eq!(stream_id("a"), 0xe40c292c);
        let spec =
            |name: &str| ParamSpec::new(name.into(), &[64], Init::KaimingUniform { fan_in: 9 });
        let a: Tensor<f64> = init_tensor(&spec("p0.gen_s.0.weight"), 1).unwrap();
        let b: Tensor<f64> = init_tensor(&spec("p0.gen_c.0.weight"), 1).unwrap();
        assert_ne!(a.as_slice(), b.as_slice());
    }

    #[test]
    fn kaiming_normal_has_the_fan_in_spread() {
        let spec = ParamSpec::new(
            "p0.conv_mask_s.weight".into(),
            &[20000],
            Init::KaimingNormal { fan_in: 8 },
        );
        let t: Tensor<f64> = init_tensor(&spec, 3).unwrap();
        let n = t.numel() as f64;
        let mean = t.as_slice().iter().sum::<f64>() / n;
        let std = (t.as_slice().iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        // std sqrt(2 / 8) = 0.5; the standard error of the estimate is 0.0025.
        assert!((std - 0.5).abs() < 0.015, "{std}");
        assert!(mean.abs() < 0.02, "{mean}");
        let ones: Tensor<f32> =
            init_tensor(&ParamSpec::new("x".into(), &[3], Init::Ones), 0).unwrap();
        assert_eq!(ones.as_slice(), &[1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_wrong_shape_is_named() {
        let [w, _] = conv_specs("p1.align", 4, 3, 1);
        let t = Tensor::<f32>::zeros(&[4, 3, 3, 3]).unwrap();
        match check_param(&w, &t).unwrap_err() {
            Error::TensorShape { name, .. } => assert_eq!(name, "p1.align.weight"),
            e => panic!("{e}"),
        }
    }
}
