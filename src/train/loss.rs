//! The training loss (`fit --loss`): binary cross-entropy, the original's and the default; focal
//! loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017); asymmetric loss (Ridnik
//! et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021). Each is the mean over
//! all elements (images x labels), as the original's BCE, so learning rates stay comparable; the
//! validation loss stays BCE whatever trains, so runs stay comparable.
//!
//! Focal and asymmetric loss are computed in fp32 whatever the logits come as (mixed precision).
//! `pos_weight` (per label) multiplies the positive term in all three, as in BCE, so with their
//! focusing turned off (gamma 0; ASL gamma 0, 0 and clip 0) both are BCE with the same weights.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// `--loss`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Binary cross-entropy, as in the original.
    #[default]
    Bce,
    /// Focal loss: BCE times (1 - p_t)^gamma.
    Focal,
    /// Asymmetric loss: focusing gamma_pos / gamma_neg and a probability margin for negatives.
    Asl,
}

/// The training loss with its parameters, as a run stores it (`{"kind": "focal", "gamma": 2.0}`;
/// a parameter left out is its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Loss {
    #[default]
    Bce,
    Focal {
        /// Focusing exponent of (1 - p_t).
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    Asl {
        /// Focusing exponent of the negatives' (shifted) probability.
        #[serde(default = "default_gamma_neg")]
        gamma_neg: f64,
        /// Focusing exponent of the positives' 1 - p.
        #[serde(default = "default_gamma_pos")]
        gamma_pos: f64,
        /// Probability margin m of the negatives: p_m = max(p - m, 0).
        #[serde(default = "default_clip")]
        clip: f64,
    },
}

/// Focal loss's gamma (Lin et al.'s choice).
pub const DEFAULT_GAMMA: f64 = 2.0;
/// Asymmetric loss's gamma_neg, gamma_pos and probability margin (the official code's defaults).
pub const DEFAULT_GAMMA_NEG: f64 = 4.0;
pub const DEFAULT_GAMMA_POS: f64 = 1.0;
pub const DEFAULT_CLIP: f64 = 0.05;
/// Largest focusing exponent accepted (the papers use at most 5).
pub const MAX_GAMMA: f64 = 10.0;

fn default_gamma() -> f64 {
    DEFAULT_GAMMA
}
fn default_gamma_neg() -> f64 {
    DEFAULT_GAMMA_NEG
}
fn default_gamma_pos() -> f64 {
    DEFAULT_GAMMA_POS
}
fn default_clip() -> f64 {
    DEFAULT_CLIP
}

impl LossKind {
    /// The loss of this kind with the default parameters.
    pub fn with_defaults(self) -> Loss {
        match self {
            LossKind::Bce => Loss::Bce,
            LossKind::Focal => Loss::Focal {
                gamma: DEFAULT_GAMMA,
            },
            LossKind::Asl => Loss::Asl {
                gamma_neg: DEFAULT_GAMMA_NEG,
                gamma_pos: DEFAULT_GAMMA_POS,
                clip: DEFAULT_CLIP,
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            LossKind::Bce => "bce",
            LossKind::Focal => "focal",
            LossKind::Asl => "asl",
        }
    }
}

impl Loss {
    /// The loss the flags ask for: `--loss KIND` and its parameters (`--gamma` for focal;
    /// `--asl-gamma-neg`, `--asl-gamma-pos`, `--asl-clip` for asl), each left out its default.
    /// A parameter of another kind, or out of range, is an error naming the flag.
    pub fn from_flags(
        kind: LossKind,
        gamma: Option<f64>,
        asl_gamma_neg: Option<f64>,
        asl_gamma_pos: Option<f64>,
        asl_clip: Option<f64>,
    ) -> Result<Loss, String> {
        let given = [
            ("--gamma", gamma, LossKind::Focal),
            ("--asl-gamma-neg", asl_gamma_neg, LossKind::Asl),
            ("--asl-gamma-pos", asl_gamma_pos, LossKind::Asl),
            ("--asl-clip", asl_clip, LossKind::Asl),
        ];
        for (flag, value, owner) in given {
            if value.is_some() && owner != kind {
                return Err(format!(
                    "{flag} is a parameter of --loss {}, not of --loss {}",
                    owner.name(),
                    kind.name()
                ));
            }
        }
        let loss = match kind.with_defaults() {
            Loss::Bce => Loss::Bce,
            Loss::Focal { gamma: g } => Loss::Focal {
                gamma: gamma.unwrap_or(g),
            },
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => Loss::Asl {
                gamma_neg: asl_gamma_neg.unwrap_or(gamma_neg),
                gamma_pos: asl_gamma_pos.unwrap_or(gamma_pos),
                clip: asl_clip.unwrap_or(clip),
            },
        };
        loss.validate()?;
        Ok(loss)
    }

    pub fn kind(&self) -> LossKind {
        match self {
            Loss::Bce => LossKind::Bce,
            Loss::Focal { .. } => LossKind::Focal,
            Loss::Asl { .. } => LossKind::Asl,
        }
    }

    /// The original's loss (BCE): what a run that does not store a loss used.
    pub fn is_default(&self) -> bool {
        *self == Loss::Bce
    }

    /// The parameters by name, in the order `Display` writes them.
    fn params(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Loss::Bce => vec![],
            Loss::Focal { gamma } => vec![("gamma", gamma)],
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => vec![
                ("gamma_neg", gamma_neg),
                ("gamma_pos", gamma_pos),
                ("clip", clip),
            ],
        }
    }

    /// Range checks (a loss read from a checkpoint included); the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in self.params() {
            let ok = match name {
                "clip" => v.is_finite() && (0.0..1.0).contains(&v),
                _ => v.is_finite() && (0.0..=MAX_GAMMA).contains(&v),
            };
            if !ok {
                let range = match name {
                    "clip" => "[0, 1)".to_string(),
                    _ => format!("[0, {MAX_GAMMA}]"),
                };
                return Err(format!(
                    "{} {name} {v} must be in {range}",
                    self.kind().name()
                ));
            }
        }
        Ok(())
    }

    /// The mean training loss over all elements of `logits` (images x labels) against `targets`
    /// (0/1, the same shape); `pos_weight` (one per label) multiplies each positive term.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor, pos_weight: Option<&Tensor>) -> Tensor {
        let x = logits.to_kind(Kind::Float);
        let y = targets.to_kind(Kind::Float);
        match *self {
            // Exactly the original's call (a no-op cast for fp32 inputs), bit for bit.
            Loss::Bce => {
                x.binary_cross_entropy_with_logits::<&Tensor>(&y, None, pos_weight, Reduction::Mean)
            }
            Loss::Focal { gamma } => {
                let pw = pos_weight.map(|w| w.to_kind(Kind::Float));
                focal_elements(&x, &y, pw.as_ref(), gamma).mean(Kind::Float)
            }
            Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            } => {
                let pw = pos_weight.map(|w| w.to_kind(Kind::Float));
                asl_elements(&x, &y, pw.as_ref(), gamma_neg, gamma_pos, clip).mean(Kind::Float)
            }
        }
    }
}

/// The validation loss of a batch, summed over its elements: BCE whatever loss trains, so the
/// `val_loss` of runs trained with different losses compare.
pub fn validation_bce_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    logits.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::Sum)
}

/// Focal loss per element, torchvision's `sigmoid_focal_loss` without alpha (class balance is
/// `pos_weight`'s job): BCE(x, y) * (1 - p_t)^gamma, the modulating factor differentiated too.
/// 1 - p_t = p (1 - y) + (1 - p) y with 1 - p as sigmoid(-x), exact where p rounds to 1; it is
/// floored at the smallest normal float so that a gamma below 1 has a finite gradient where it
/// underflows to 0 (the term is then below 1e-38 anyway).
fn focal_elements(x: &Tensor, y: &Tensor, pos_weight: Option<&Tensor>, gamma: f64) -> Tensor {
    let ce = x.binary_cross_entropy_with_logits::<&Tensor>(y, None, pos_weight, Reduction::None);
    let one_minus_pt: Tensor = x.sigmoid() * (1.0 - y) + (-x).sigmoid() * y;
    ce * one_minus_pt
        .clamp_min(f64::from(f32::MIN_POSITIVE))
        .pow_tensor_scalar(gamma)
}

/// Asymmetric loss per element, as the official `AsymmetricLoss` (Alibaba-MIIL/ASL,
/// `src/loss_functions/losses.py`) with its defaults:
/// -(y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m)), p_m = max(p - clip, 0),
/// the focusing weights computed without gradient (`disable_torch_grad_focal_loss=True`, its
/// default and that of its training script). Two differences, both numerical: the logs are
/// log-sigmoids where the official code takes log(max(p, 1e-8)), so the values agree wherever
/// p >= 1e-8 (logits above -18.4; and for the negatives always when clip > 0) and a confidently
/// wrong positive still gets a gradient; and the mean over elements where it returns the sum.
fn asl_elements(
    x: &Tensor,
    y: &Tensor,
    pos_weight: Option<&Tensor>,
    gamma_neg: f64,
    gamma_pos: f64,
    clip: f64,
) -> Tensor {
    let p = x.sigmoid();
    let anti = 1.0 - y;
    // 1 - p_m, the shifted probability of the negative outcome, and its log.
    let (xs_neg, log_neg) = match clip > 0.0 {
        true => {
            let m = ((-x).sigmoid() + clip).clamp_max(1.0);
            let log = m.log();
            (m, log)
        }
        false => ((-x).sigmoid(), (-x).log_sigmoid()),
    };
    let pos = match pos_weight {
        Some(w) => y * x.log_sigmoid() * w,
        None => y * x.log_sigmoid(),
    };
    let ce = pos + &anti * log_neg;
    let weight = tch::no_grad(|| {
        let pt: Tensor = &p * y + &xs_neg * &anti;
        let gamma: Tensor = y * gamma_pos + &anti * gamma_neg;
        let q: Tensor = 1.0 - pt;
        q.clamp_min(0.0).pow(&gamma)
    });
    -(ce * weight)
}

impl fmt::Display for Loss {
    /// `bce`, `focal:gamma=2`, `asl:gamma_neg=4,gamma_pos=1,clip=0.05` (what `from_str` reads).
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.kind().name())?;
        let params: Vec<String> = self
            .params()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !params.is_empty() {
            write!(f, ":{}", params.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for Loss {
    type Err = String;

    /// `KIND[:NAME=VALUE,...]`, e.g. `focal`, `focal:gamma=1`, `asl:clip=0.1`; a parameter left
    /// out is its default.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let kind = <LossKind as clap::ValueEnum>::from_str(kind, false)
            .map_err(|_| format!("unknown loss {kind:?} (expected bce, focal or asl)"))?;
        let mut loss = kind.with_defaults();
        for item in rest.split(',').filter(|i| !i.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("loss parameter {item:?} is not NAME=VALUE"))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| format!("loss parameter {name}: {value:?} is not a number"))?;
            let slot = match (&mut loss, name.trim()) {
                (Loss::Focal { gamma }, "gamma") => gamma,
                (Loss::Asl { gamma_neg, .. }, "gamma_neg") => gamma_neg,
                (Loss::Asl { gamma_pos, .. }, "gamma_pos") => gamma_pos,
                (Loss::Asl { clip, .. }, "clip") => clip,
                _ => return Err(format!("{} has no parameter {name:?}", kind.name())),
            };
            *slot = value;
        }
        loss.validate()?;
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Lin et al.'s focal loss of one element, in f64: -(w y log p + (1-y) log(1-p)) (1-p_t)^gamma.
    fn focal_ref(x: f64, y: f64, w: f64, gamma: f64) -> f64 {
        let p = sigmoid(x);
        let ce = -(w * y * p.ln() + (1.0 - y) * (1.0 - p).ln());
        let pt = p * y + (1.0 - p) * (1.0 - y);
        ce * (1.0 - pt).powf(gamma)
    }

    /// Ridnik et al.'s asymmetric loss of one element (binary y), in f64.
    fn asl_ref(x: f64, y: f64, w: f64, (gn, gp, clip): (f64, f64, f64)) -> f64 {
        let p = sigmoid(x);
        let pm = (p - clip).max(0.0);
        match y > 0.5 {
            true => -w * (1.0 - p).powf(gp) * p.ln(),
            false => -pm.powf(gn) * (1.0 - pm).ln(),
        }
    }

    /// Its derivative in x with the focusing weights held constant (no gradient through them).
    fn asl_ref_grad(x: f64, y: f64, w: f64, (gn, gp, clip): (f64, f64, f64)) -> f64 {
        let p = sigmoid(x);
        let pm = (p - clip).max(0.0);
        match y > 0.5 {
            true => -w * (1.0 - p).powf(gp) * (1.0 - p),
            false if p > clip => pm.powf(gn) * p * (1.0 - p) / (1.0 - p + clip),
            false => 0.0,
        }
    }

    const X: [f64; 12] = [
        -3.0, -0.5, 0.0, 0.7, 2.5, 6.0, 1.5, -2.0, 0.3, -6.0, 4.0, -0.04,
    ];
    const Y: [f64; 12] = [1., 0., 1., 0., 1., 0., 0., 1., 1., 0., 0., 1.];
    const W: [f64; 3] = [2.0, 0.5, 1.0];

    fn tensor(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float).reshape(shape)
    }

    fn floats(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// The loss and d loss / d logits of `loss` on logits `x` (rows of 3 labels) as `kind`.
    fn run(loss: Loss, x: &[f64], y: &[f64], w: Option<&[f64]>, kind: Kind) -> (Tensor, Tensor) {
        let shape = [x.len() as i64 / 3, 3];
        let xs = tensor(x, &shape).to_kind(kind).set_requires_grad(true);
        let pw = w.map(|w| tensor(w, &[3]));
        let l = loss.loss(&xs, &tensor(y, &shape), pw.as_ref());
        l.backward();
        (l, xs.grad())
    }

    fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = rel * w.abs().max(1e-3);
            assert!(
                (g - w).abs() <= tol,
                "{what}[{i}]: {g} vs {w}\n{got:?}\n{want:?}"
            );
        }
    }

    #[test]
    fn focal_matches_the_formula_and_its_gradient() {
        for gamma in [2.0, 0.5, 1.0] {
            let loss = Loss::Focal { gamma };
            let (l, g) = run(loss, &X, &Y, Some(&W), Kind::Float);
            let n = X.len() as f64;
            let f = |i: usize, x: f64| focal_ref(x, Y[i], W[i % 3], gamma) / n;
            let want: f64 = (0..X.len()).map(|i| f(i, X[i])).sum();
            assert_close(&floats(&l), &[want], 1e-5, &format!("{loss} value"));
            // Central differences: the modulating factor is differentiated too (torchvision).
            let h = 1e-5;
            let fd: Vec<f64> = (0..X.len())
                .map(|i| (f(i, X[i] + h) - f(i, X[i] - h)) / (2.0 * h))
                .collect();
            assert_close(&floats(&g), &fd, 1e-3, &format!("{loss} gradient"));
        }
    }

    #[test]
    fn asl_matches_the_formula_with_constant_focusing_weights() {
        for params in [(4.0, 1.0, 0.05), (2.0, 0.0, 0.2), (1.0, 2.0, 0.0)] {
            let (gamma_neg, gamma_pos, clip) = params;
            let loss = Loss::Asl {
                gamma_neg,
                gamma_pos,
                clip,
            };
            let (l, g) = run(loss, &X, &Y, Some(&W), Kind::Float);
            let n = X.len() as f64;
            let want: f64 = (0..X.len())
                .map(|i| asl_ref(X[i], Y[i], W[i % 3], params) / n)
                .sum();
            assert_close(&floats(&l), &[want], 1e-5, &format!("{loss} value"));
            let grad: Vec<f64> = (0..X.len())
                .map(|i| asl_ref_grad(X[i], Y[i], W[i % 3], params) / n)
                .collect();
            assert_close(&floats(&g), &grad, 1e-4, &format!("{loss} gradient"));
        }
        // The negative at logit 0.7 (p 0.67 > clip) gets a gradient that the full derivative
        // (weights differentiated) would make larger: the weights are held constant.
        let p = sigmoid(0.7);
        let full = {
            let f = |x| asl_ref(x, 0.0, 1.0, (4.0, 1.0, 0.05));
            (f(0.7 + 1e-6) - f(0.7 - 1e-6)) / 2e-6
        };
        assert!(
            full > 1.5 * asl_ref_grad(0.7, 0.0, 1.0, (4.0, 1.0, 0.05)),
            "{p} {full}"
        );
    }

    fn extremes() -> (Vec<f64>, Vec<f64>) {
        let x = [30.0, -30.0, 100.0, -100.0, 1e4, -1e4];
        let xs: Vec<f64> = x.iter().chain(&x).copied().collect();
        let ys: Vec<f64> = (0..12).map(|i| if i < 6 { 1.0 } else { 0.0 }).collect();
        (xs, ys)
    }

    #[test]
    fn extreme_logits_give_finite_losses_and_gradients_in_every_precision() {
        let (x, y) = extremes();
        let losses = [
            Loss::Bce,
            LossKind::Focal.with_defaults(),
            Loss::Focal { gamma: 0.5 },
            LossKind::Asl.with_defaults(),
            Loss::Asl {
                gamma_neg: 0.5,
                gamma_pos: 0.5,
                clip: 0.0,
            },
        ];
        for loss in losses {
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                let (l, g) = run(loss, &x, &y, Some(&W), kind);
                assert_eq!(l.kind(), Kind::Float, "{loss} {kind:?}");
                let (l, g) = (floats(&l), floats(&g));
                assert!(l[0].is_finite(), "{loss} {kind:?}: loss {l:?}");
                assert!(g.iter().all(|v| v.is_finite()), "{loss} {kind:?}: {g:?}");
                // Confidently wrong positives (logits -30, -100, -1e4) still learn: about -w/n.
                for i in [1usize, 3, 5] {
                    let want = -W[i % 3] / 12.0;
                    assert!(
                        (g[i] - want).abs() < 0.05 * want.abs(),
                        "{loss} {kind:?}: {g:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn bce_is_the_original_call_bit_for_bit() {
        tch::manual_seed(3);
        let x = (Tensor::randn([16, 14], (Kind::Float, Device::Cpu)) * 8.0).set_requires_grad(true);
        let y = Tensor::rand([16, 14], (Kind::Float, Device::Cpu))
            .ge(0.7)
            .to_kind(Kind::Float);
        let pw = Tensor::rand([14], (Kind::Float, Device::Cpu)) * 5.0;
        for w in [None, Some(&pw)] {
            let ours = Loss::Bce.loss(&x, &y, w);
            let x2 = x.detach().copy().set_requires_grad(true);
            let original = x2
                .to_kind(Kind::Float)
                .binary_cross_entropy_with_logits::<&Tensor>(&y, None, w, Reduction::Mean);
            assert_eq!(
                ours.double_value(&[]).to_bits(),
                original.double_value(&[]).to_bits()
            );
            let gx = Tensor::run_backward(&[&ours], &[&x], false, false);
            original.backward();
            assert!(gx[0].equal(&x2.grad()), "gradients differ");
        }
    }

    #[test]
    fn without_focusing_focal_and_asl_are_bce() {
        let (ex, ey) = extremes();
        let x: Vec<f64> = X.iter().chain(&ex).copied().collect();
        let y: Vec<f64> = Y.iter().chain(&ey).copied().collect();
        let plain = [
            Loss::Focal { gamma: 0.0 },
            Loss::Asl {
                gamma_neg: 0.0,
                gamma_pos: 0.0,
                clip: 0.0,
            },
        ];
        for w in [None, Some(&W[..])] {
            let (bl, bg) = run(Loss::Bce, &x, &y, w, Kind::Float);
            for loss in plain {
                let (l, g) = run(loss, &x, &y, w, Kind::Float);
                assert_close(&floats(&l), &floats(&bl), 1e-6, &format!("{loss} {w:?}"));
                assert_close(
                    &floats(&g),
                    &floats(&bg),
                    1e-5,
                    &format!("{loss} {w:?} grad"),
                );
            }
        }
    }

    #[test]
    fn half_precision_logits_are_computed_in_fp32() {
        for loss in [
            LossKind::Focal.with_defaults(),
            LossKind::Asl.with_defaults(),
        ] {
            for kind in [Kind::BFloat16, Kind::Half] {
                let low = tensor(&X, &[4, 3]).to_kind(kind);
                let y = tensor(&Y, &[4, 3]);
                let a = loss.loss(&low, &y, None);
                let b = loss.loss(&low.to_kind(Kind::Float), &y, None);
                assert_eq!(a.kind(), Kind::Float);
                assert_eq!(a.double_value(&[]).to_bits(), b.double_value(&[]).to_bits());
            }
        }
    }

    #[test]
    fn settings_round_trip_and_missing_parameters_are_defaults() {
        assert_eq!(
            serde_json::to_string(&Loss::Bce).unwrap(),
            r#"{"kind":"bce"}"#
        );
        assert!(Loss::default().is_default());
        assert!(!LossKind::Focal.with_defaults().is_default());
        for loss in [
            Loss::Bce,
            Loss::Focal { gamma: 0.5 },
            LossKind::Asl.with_defaults(),
        ] {
            let json = serde_json::to_string(&loss).unwrap();
            assert_eq!(serde_json::from_str::<Loss>(&json).unwrap(), loss, "{json}");
            assert_eq!(loss.to_string().parse::<Loss>(), Ok(loss));
        }
        let asl: Loss = serde_json::from_str(r#"{"kind":"asl","clip":0.1}"#).unwrap();
        let want = Loss::Asl {
            gamma_neg: 4.0,
            gamma_pos: 1.0,
            clip: 0.1,
        };
        assert_eq!(asl, want);
        assert!(serde_json::from_str::<Loss>(r#"{"kind":"hinge"}"#).is_err());
        let bad: Loss = serde_json::from_str(r#"{"kind":"focal","gamma":-1.0}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("gamma -1"));
    }

    #[test]
    fn loss_text_and_flags_reject_what_does_not_belong() {
        assert_eq!(
            LossKind::Asl.with_defaults().to_string(),
            "asl:gamma_neg=4,gamma_pos=1,clip=0.05"
        );
        assert_eq!("focal".parse(), Ok(Loss::Focal { gamma: 2.0 }));
        assert_eq!("focal:gamma=0.5".parse(), Ok(Loss::Focal { gamma: 0.5 }));
        for bad in [
            "hinge",
            "bce:gamma=1",
            "focal:gamma_neg=1",
            "focal:gamma",
            "focal:gamma=abc",
            "focal:gamma=NaN",
            "focal:gamma=11",
            "asl:clip=1",
            "asl:clip=-0.1",
        ] {
            assert!(bad.parse::<Loss>().is_err(), "{bad}");
        }
        let f = Loss::from_flags;
        assert_eq!(
            f(LossKind::Asl, None, Some(2.0), None, None),
            Ok(Loss::Asl {
                gamma_neg: 2.0,
                gamma_pos: 1.0,
                clip: 0.05
            })
        );
        assert_eq!(
            f(LossKind::Focal, None, None, None, None),
            Ok(Loss::Focal { gamma: 2.0 })
        );
        assert!(f(LossKind::Focal, None, None, None, Some(0.1))
            .unwrap_err()
            .contains("--asl-clip"));
        assert!(f(LossKind::Asl, Some(1.0), None, None, None)
            .unwrap_err()
            .contains("--gamma"));
        assert!(f(LossKind::Bce, Some(1.0), None, None, None).is_err());
        assert!(f(LossKind::Asl, None, None, None, Some(1.5))
            .unwrap_err()
            .contains("clip"));
    }
}
