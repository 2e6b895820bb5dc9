//! The training recipe's choices beyond the original's constant-rate Adam: the learning-rate
//! schedule, per-label positive weights of the loss and early stopping. Each is a pure function
//! of the run's settings and history, so a resumed run makes the same choices.

use serde::{Deserialize, Serialize};

/// `--recipe`: a preset of the options below.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The original Keras scripts' recipe: constant-rate Adam 1e-4, nothing else.
    #[default]
    Original,
    /// Warm-up and cosine decay from 1e-3, weight EMA and precise batch-norm statistics.
    Modern,
}

/// `--lr-schedule`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Cosine decay from the peak rate to zero over the run (Loshchilov & Hutter, SGDR, 2017).
    Cosine,
}

/// `--pos-weight`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PosWeight {
    /// Every label's positives weigh as much as its negatives, as in the original.
    #[default]
    None,
    /// Each label's positives weigh negatives/positives of the training split.
    Auto,
}

/// The recipe's options as a run stores them (see `FitSettings`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecipeSettings {
    pub preset: Recipe,
    pub lr_schedule: LrSchedule,
    /// Epochs of linear warm-up from lr/steps to lr (Goyal et al., 2017), fractional allowed.
    pub warmup_epochs: f64,
    /// Decay of the exponential moving average of the weights that is validated, checkpointed
    /// and exported; none: the trained weights themselves.
    pub ema: Option<f64>,
    /// Training images over which batch-norm statistics are recomputed before each validation
    /// (precise BN, Wu & Johnson 2021); 0: the running averages of training.
    pub precise_bn: usize,
    /// Stop after this many epochs without a lower validation loss.
    pub patience: Option<usize>,
    pub pos_weight: PosWeight,
    /// Epochs at the start that train only the head (the backbone gets no gradient).
    pub freeze_backbone_epochs: usize,
}

impl RecipeSettings {
    /// What `--recipe modern` sets where the user gave nothing.
    pub const MODERN_LR: f64 = 1e-3;
    pub const MODERN_WARMUP_EPOCHS: f64 = 1.0;
    pub const MODERN_EMA: f64 = 0.998;
    pub const MODERN_PRECISE_BN: usize = 2048;

    /// The preset's Adam learning rate (the peak, with a schedule): the original's 1e-4.
    pub fn preset_lr(recipe: Recipe) -> f64 {
        match recipe {
            Recipe::Original => 1e-4,
            Recipe::Modern => Self::MODERN_LR,
        }
    }

    /// The preset's values (the original's are all off).
    pub fn preset(recipe: Recipe) -> Self {
        match recipe {
            Recipe::Original => RecipeSettings::default(),
            Recipe::Modern => RecipeSettings {
                preset: recipe,
                lr_schedule: LrSchedule::Cosine,
                warmup_epochs: Self::MODERN_WARMUP_EPOCHS,
                ema: Some(Self::MODERN_EMA),
                precise_bn: Self::MODERN_PRECISE_BN,
                ..Default::default()
            },
        }
    }

    /// Range checks; the error names the setting.
    pub fn validate(&self, epochs: usize) -> Result<(), String> {
        if !(self.warmup_epochs.is_finite() && (0.0..=epochs as f64).contains(&self.warmup_epochs))
        {
            return Err(format!(
                "warmup_epochs {} must be in [0, epochs = {epochs}]",
                self.warmup_epochs
            ));
        }
        if let Some(d) = self.ema {
            if !(0.0..1.0).contains(&d) {
                return Err(format!("ema {d} must be in [0, 1)"));
            }
        }
        if self.patience == Some(0) {
            return Err("patience must be at least 1".into());
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based over the whole run) of a run of
    /// `epochs` epochs of `steps_per_epoch` steps, with peak rate `lr`.
    pub fn lr_at(&self, lr: f64, step: usize, steps_per_epoch: usize, epochs: usize) -> f64 {
        let total = (steps_per_epoch * epochs).max(1);
        let warmup = ((self.warmup_epochs * steps_per_epoch as f64).round() as usize).min(total);
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine => {
                let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                lr * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }

    /// The EMA decay at optimizer step `step` (1-based): the set decay, lower early on so the
    /// average is not dominated by the random initial weights (TensorFlow's
    /// `ExponentialMovingAverage(num_updates=...)`: min(decay, (1 + t) / (10 + t))).
    pub fn ema_decay(&self, step: i64) -> Option<f64> {
        let t = step as f64;
        self.ema.map(|d| d.min((1.0 + t) / (10.0 + t)))
    }
}

/// Per-label weights of the positives in the loss: negatives / positives among `rows` (each a
/// 0/1 target row of `labels` values). A label without positives or without negatives gets 1.
pub fn pos_weights(targets: &[f32], labels: usize, rows: &[usize]) -> Vec<f64> {
    (0..labels)
        .map(|l| {
            let pos = rows
                .iter()
                .filter(|&&r| targets[r * labels + l] > 0.5)
                .count();
            let neg = rows.len() - pos;
            if pos == 0 || neg == 0 {
                1.0
            } else {
                neg as f64 / pos as f64
            }
        })
        .collect()
}

/// Early stopping: the reason to stop after `epoch`, when `patience` epochs have passed since the
/// best validation loss (of `best_epoch`).
pub fn stop_reason(
    patience: Option<usize>,
    epoch: usize,
    best_epoch: Option<usize>,
    best: Option<f64>,
    watched: &str,
) -> Option<String> {
    let (patience, best_epoch, best) = (patience?, best_epoch?, best?);
    (epoch >= best_epoch + patience).then(|| {
        format!(
            "early stopping after epoch {epoch}: {watched} has not improved for \
             {patience} epochs (best {best:.6} at epoch {best_epoch})"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warm_up_rises_linearly_then_cosine_decays_to_zero() {
        let r = RecipeSettings {
            lr_schedule: LrSchedule::Cosine,
            warmup_epochs: 1.0,
            ..Default::default()
        };
        // 3 epochs of 4 steps: 4 warm-up steps, then 8 cosine steps.
        let lrs: Vec<f64> = (0..12).map(|s| r.lr_at(1.0, s, 4, 3)).collect();
        for (s, want) in [0.25, 0.5, 0.75, 1.0].iter().enumerate() {
            assert!(close(lrs[s], *want), "{lrs:?}");
        }
        for k in 0..8 {
            let want = 0.5 * (1.0 + (std::f64::consts::PI * k as f64 / 8.0).cos());
            assert!(close(lrs[4 + k], want), "step {}: {lrs:?}", 4 + k);
        }
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]));
        // Past the end (epochs raised by hand) it stays at the floor.
        assert!(close(r.lr_at(1.0, 40, 4, 3), 0.0));
    }

    #[test]
    fn constant_schedule_is_the_original_rate() {
        let r = RecipeSettings::default();
        assert!((0..50).all(|s| r.lr_at(1e-4, s, 7, 3) == 1e-4));
        let warm = RecipeSettings {
            warmup_epochs: 0.5,
            ..Default::default()
        };
        assert!(close(warm.lr_at(2.0, 0, 4, 3), 1.0));
        assert!(close(warm.lr_at(2.0, 1, 4, 3), 2.0));
        assert!(close(warm.lr_at(2.0, 11, 4, 3), 2.0));
    }

    #[test]
    fn ema_decay_warms_up_to_the_set_value() {
        let r = RecipeSettings {
            ema: Some(0.99),
            ..Default::default()
        };
        assert!(close(r.ema_decay(1).unwrap(), 2.0 / 11.0));
        assert!(close(r.ema_decay(10).unwrap(), 11.0 / 20.0));
        assert!(close(r.ema_decay(100_000).unwrap(), 0.99));
        assert_eq!(RecipeSettings::default().ema_decay(5), None);
    }

    #[test]
    fn pos_weights_are_negatives_over_positives_of_the_rows_given() {
        // 4 rows x 3 labels; label 0: 1 positive of 3 rows used, label 1: none, label 2: all.
        let t = [
            1.0, 0.0, 1.0, //
            0.0, 0.0, 1.0, //
            0.0, 0.0, 1.0, //
            1.0, 0.0, 1.0, // not in the training rows
        ];
        assert_eq!(pos_weights(&t, 3, &[0, 1, 2]), vec![2.0, 1.0, 1.0]);
        assert_eq!(pos_weights(&t, 3, &[0, 1, 2, 3]), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn early_stopping_triggers_after_patience_epochs_without_improvement() {
        assert_eq!(
            stop_reason(Some(3), 5, Some(3), Some(0.1), "the validation loss"),
            None
        );
        let reason = stop_reason(Some(3), 6, Some(3), Some(0.1), "the validation loss").unwrap();
        assert!(reason.contains("after epoch 6") && reason.contains("epoch 3"));
        assert_eq!(
            stop_reason(None, 60, Some(3), Some(0.1), "the validation loss"),
            None
        );
        // No validation: never.
        assert_eq!(
            stop_reason(Some(1), 60, None, None, "the validation loss"),
            None
        );
    }

    #[test]
    fn presets_and_ranges() {
        assert_eq!(
            RecipeSettings::preset(Recipe::Original),
            RecipeSettings::default()
        );
        let modern = RecipeSettings::preset(Recipe::Modern);
        assert!(modern.validate(5).is_ok());
        assert!(modern.validate(0).unwrap_err().contains("warmup_epochs"));
        let bad = RecipeSettings {
            ema: Some(1.0),
            ..Default::default()
        };
        assert!(bad.validate(5).unwrap_err().contains("ema"));
    }
}
