//! Loss configuration: one object per FPN level (`docs/spec.md`, "Exchange format").
//!
//! `{"levels":[{"method":"dmkd","tau":0.5,"lambda_s":0.65,"lambda_c":0.65,
//!   "alpha":2e-5,"mask_mode":"topk","seed":0}]}`; missing keys take the
//! defaults, unknown keys are an error (a misspelt key must not silently
//! fall back to a default).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which loss a level computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Dual Masked Knowledge Distillation (the product).
    #[default]
    Dmkd,
    /// Masked Generative Distillation (baseline).
    Mgd,
    /// Focal and Global Distillation (baseline; needs boxes).
    Fgd,
}

/// How the masked set is chosen (`docs/spec.md`, "Masks").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskMode {
    /// The k highest-attention entries (deterministic, no RNG).
    #[default]
    Topk,
    /// Gumbel-top-k: k entries drawn without replacement, probability proportional to attention.
    Sampled,
    /// MGD's uniform mask: masked where `u > 1 - lambda`.
    Random,
}

fn default_tau() -> f64 {
    0.5
}
fn default_lambda() -> f64 {
    0.65
}
fn default_alpha() -> f64 {
    2e-5
}
fn default_alpha_fgd() -> f64 {
    0.001
}
fn default_beta_fgd() -> f64 {
    0.0005
}
fn default_gamma_fgd() -> f64 {
    0.0005
}
fn default_lambda_fgd() -> f64 {
    0.000005
}

/// The configuration of one FPN level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    /// Which loss.
    #[serde(default)]
    pub method: Method,
    /// Attention temperature.
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// Spatial mask ratio (MGD's only ratio).
    #[serde(default = "default_lambda")]
    pub lambda_s: f64,
    /// Channel mask ratio.
    #[serde(default = "default_lambda")]
    pub lambda_c: f64,
    /// Loss weight of DMKD and MGD.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// How the masked set is chosen.
    #[serde(default)]
    pub mask_mode: MaskMode,
    /// Philox key of the mask uniforms.
    #[serde(default)]
    pub seed: u64,
    /// FGD weights (FGD's RetinaNet config).
    #[serde(default = "default_alpha_fgd")]
    pub alpha_fgd: f64,
    /// FGD's background weight.
    #[serde(default = "default_beta_fgd")]
    pub beta_fgd: f64,
    /// FGD's attention-transfer weight.
    #[serde(default = "default_gamma_fgd")]
    pub gamma_fgd: f64,
    /// FGD's global-relation weight.
    #[serde(default = "default_lambda_fgd")]
    pub lambda_fgd: f64,
}

impl Default for LevelConfig {
    fn default() -> Self {
        LevelConfig {
            method: Method::Dmkd,
            tau: default_tau(),
            lambda_s: default_lambda(),
            lambda_c: default_lambda(),
            alpha: default_alpha(),
            mask_mode: MaskMode::Topk,
            seed: 0,
            alpha_fgd: default_alpha_fgd(),
            beta_fgd: default_beta_fgd(),
            gamma_fgd: default_gamma_fgd(),
            lambda_fgd: default_lambda_fgd(),
        }
    }
}

impl LevelConfig {
    /// Check every value is in its valid range.
    pub fn validate(&self, level: usize) -> Result<()> {
        let bad = |what: &str, v: f64, want: &str| {
            Err(Error::Config(format!(
                "level {level}: {what} = {v} is invalid ({want})"
            )))
        };
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad("tau", self.tau, "must be finite and > 0");
        }
        for (name, v) in [("lambda_s", self.lambda_s), ("lambda_c", self.lambda_c)] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, v, "must lie in [0, 1)");
            }
        }
        for (name, v) in [
            ("alpha", self.alpha),
            ("alpha_fgd", self.alpha_fgd),
            ("beta_fgd", self.beta_fgd),
            ("gamma_fgd", self.gamma_fgd),
            ("lambda_fgd", self.lambda_fgd),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(name, v, "must be finite and >= 0");
            }
        }
        Ok(())
    }
}

/// The whole loss: one entry per FPN level, in level order (level 0 = P3
/// for RetinaNet).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One entry per level.
    pub levels: Vec<LevelConfig>,
}

/// Longest config text accepted (a config is a few hundred bytes per level).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Most levels accepted (an FPN has 4 to 6).
pub const MAX_LEVELS: usize = 64;

impl Config {
    /// `n` levels with the default settings.
    pub fn uniform(n: usize, level: LevelConfig) -> Self {
        Config {
            levels: vec![level; n],
        }
    }

    /// Parse and validate JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(Error::Config(format!(
                "config is {} bytes, over the limit of {MAX_CONFIG_BYTES}",
                text.len()
            )));
        }
        let cfg: Config = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The JSON text (parses back to the same values).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a config always serialises")
    }

    /// Check the level count and every level's values.
    pub fn validate(&self) -> Result<()> {
        if self.levels.is_empty() {
            return Err(Error::Config("no levels".into()));
        }
        if self.levels.len() > MAX_LEVELS {
            return Err(Error::Config(format!(
                "{} levels, more than the limit of {MAX_LEVELS}",
                self.levels.len()
            )));
        }
        for (l, lc) in self.levels.iter().enumerate() {
            lc.validate(l)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_keys() {
        let c = Config::from_json(r#"{"levels":[{}, {"method":"mgd","seed":7}]}"#).unwrap();
        assert_eq!(c.levels[0], LevelConfig::default());
        assert_eq!(c.levels[1].method, Method::Mgd);
        assert_eq!(c.levels[1].seed, 7);
        assert_eq!(c.levels[1].lambda_s, 0.65);
        assert_eq!(c.levels[0].alpha, 2e-5);
        assert_eq!(c.levels[0].tau, 0.5);
    }

    #[test]
    fn out_of_range_values_and_unknown_keys_are_refused() {
        for bad in [
            r#"{"levels":[{"tau":0}]}"#,
            r#"{"levels":[{"tau":-1}]}"#,
            r#"{"levels":[{"lambda_s":1.0}]}"#,
            r#"{"levels":[{"lambda_c":-0.1}]}"#,
            r#"{"levels":[{"alpha":-1e-5}]}"#,
            r#"{"levels":[{"lamda_s":0.5}]}"#,
            r#"{"levels":[{"mask_mode":"best"}]}"#,
            r#"{"levels":[]}"#,
            r#"{"levels":[{"seed":-1}]}"#,
            r#"{"levels":"#,
        ] {
            let e = Config::from_json(bad).unwrap_err();
            assert_eq!(e.kind(), "config", "{bad}");
        }
    }

    #[test]
    fn every_range_is_checked_at_both_ends() {
        // Zero is a legal weight and a legal ratio (nothing masked).
        let edge = Config::from_json(
            r#"{"levels":[{"alpha":0,"lambda_s":0,"lambda_c":0,"alpha_fgd":0,
                "beta_fgd":0,"gamma_fgd":0,"lambda_fgd":0,"tau":1e-300}]}"#,
        );
        assert!(edge.is_ok(), "{edge:?}");
        // Values JSON cannot carry (inf, NaN) reach `validate` from Rust
        // and Python; each message names the key.
        type Field = fn(&mut LevelConfig) -> &mut f64;
        let fields: [(&str, Field); 8] = [
            ("tau", |c| &mut c.tau),
            ("lambda_s", |c| &mut c.lambda_s),
            ("lambda_c", |c| &mut c.lambda_c),
            ("alpha", |c| &mut c.alpha),
            ("alpha_fgd", |c| &mut c.alpha_fgd),
            ("beta_fgd", |c| &mut c.beta_fgd),
            ("gamma_fgd", |c| &mut c.gamma_fgd),
            ("lambda_fgd", |c| &mut c.lambda_fgd),
        ];
        for (key, field) in fields {
            for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-300] {
                let mut lc = LevelConfig::default();
                *field(&mut lc) = v;
                let e = lc.validate(3).unwrap_err().to_string();
                assert!(
                    e.contains(&format!("level 3: {key} = ")),
                    "{key} = {v}: {e}"
                );
            }
        }
    }

    #[test]
    fn fgd_defaults_are_its_retinanet_config() {
        let c = Config::from_json(r#"{"levels":[{"method":"fgd"}]}"#).unwrap();
        let l = &c.levels[0];
        assert_eq!(
            (l.alpha_fgd, l.beta_fgd, l.gamma_fgd, l.lambda_fgd),
            (0.001, 0.0005, 0.0005, 0.000005)
        );
        assert_eq!(l.tau, 0.5);
    }

    #[test]
    fn size_limits_are_inclusive() {
        let level = r#"{"seed":1}"#;
        let at_limit = format!(r#"{{"levels":[{}]}}"#, vec![level; MAX_LEVELS].join(","));
        assert_eq!(
            Config::from_json(&at_limit).unwrap().levels.len(),
            MAX_LEVELS
        );
        let over = format!(
            r#"{{"levels":[{}]}}"#,
            vec![level; MAX_LEVELS + 1].join(",")
        );
        assert_eq!(Config::from_json(&over).unwrap_err().kind(), "config");
        // Exactly MAX_CONFIG_BYTES of valid JSON (padded with spaces) is accepted.
        let base = r#"{"levels":[{}]}"#;
        let padded = format!("{base}{}", " ".repeat(MAX_CONFIG_BYTES - base.len()));
        assert!(Config::from_json(&padded).is_ok());
        let too_long = format!("{padded} ");
        assert_eq!(Config::from_json(&too_long).unwrap_err().kind(), "config");
    }

    #[test]
    fn a_u64_seed_round_trips() {
        let c = Config::from_json(r#"{"levels":[{"seed":18446744073709551615}]}"#).unwrap();
        assert_eq!(c.levels[0].seed, u64::MAX);
        assert_eq!(Config::from_json(&c.to_json()).unwrap(), c);
    }
}
