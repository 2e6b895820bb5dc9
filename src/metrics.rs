//! Multi-label metrics: per-label counts first, scores derived from them.

/// Per-label confusion counts at one threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Counts {
    /// Positives in the ground truth.
    pub fn support(&self) -> u64 {
        self.tp + self.fn_
    }
    /// tp / (tp + fp), 0 when nothing was predicted.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    /// tp / (tp + fn), 0 when there are no positives.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// 2tp / (2tp + fp + fn), 0 when all three are 0.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
    fn add(&mut self, other: &Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.tn += other.tn;
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Counts for each label from probabilities and 0/1 targets (row-major, `n_labels` per image);
/// an output counts as positive when `p > threshold`, as the original's tagger (`> 0.4`) and its
/// training metric (`K.round(p)`, which rounds 0.5 down) decide.
pub fn count(probs: &[f32], targets: &[f32], n_labels: usize, thresholds: &[f32]) -> Vec<Counts> {
    assert_eq!(probs.len(), targets.len());
    assert_eq!(thresholds.len(), n_labels);
    let mut counts = vec![Counts::default(); n_labels];
    for (row_p, row_t) in probs
        .chunks_exact(n_labels)
        .zip(targets.chunks_exact(n_labels))
    {
        for (l, c) in counts.iter_mut().enumerate() {
            match (row_p[l] > thresholds[l], row_t[l] >= 0.5) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
    }
    counts
}

/// F1 of the summed counts over all labels: what the original logs as "macro F1".
pub fn micro_f1(counts: &[Counts]) -> f64 {
    let mut total = Counts::default();
    for c in counts {
        total.add(c);
    }
    total.f1()
}

/// Mean F1 over the labels with at least one positive; `None` when no label has one.
pub fn macro_f1(counts: &[Counts]) -> Option<f64> {
    let present: Vec<f64> = counts
        .iter()
        .filter(|c| c.support() > 0)
        .map(Counts::f1)
        .collect();
    (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
}

/// Mean binary cross-entropy over all outputs, from probabilities clipped like Keras (1e-7).
pub fn bce(probs: &[f32], targets: &[f32]) -> f64 {
    let eps = 1e-7f64;
    let sum: f64 = probs
        .iter()
        .zip(targets)
        .map(|(&p, &t)| {
            let p = (p as f64).clamp(eps, 1.0 - eps);
            -(t as f64 * p.ln() + (1.0 - t as f64) * (1.0 - p).ln())
        })
        .sum();
    sum / probs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: [f32; 2] = [0.5, 0.5];

    #[test]
    fn hand_computed_case() {
        // 4 images, 2 labels.
        let probs = [0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.4, 0.3];
        let targets = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        let c = count(&probs, &targets, 2, &T);
        assert_eq!(
            c[0],
            Counts {
                tp: 2,
                fp: 0,
                fn_: 1,
                tn: 1
            }
        );
        assert_eq!(
            c[1],
            Counts {
                tp: 1,
                fp: 1,
                fn_: 0,
                tn: 2
            }
        );
        assert!((c[0].precision() - 1.0).abs() < 1e-12);
        assert!((c[0].recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c[0].f1() - 0.8).abs() < 1e-12);
        assert!((c[1].f1() - 2.0 / 3.0).abs() < 1e-12);
        assert!((macro_f1(&c).unwrap() - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // micro: tp 3, fp 1, fn 1 -> 6 / 8
        assert!((micro_f1(&c) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn label_without_positives_is_left_out_of_macro() {
        let probs = [0.9, 0.7, 0.8, 0.1];
        let targets = [1.0, 0.0, 1.0, 0.0];
        let c = count(&probs, &targets, 2, &T);
        assert_eq!(c[1].support(), 0);
        assert_eq!(c[1].f1(), 0.0);
        assert_eq!(macro_f1(&c), Some(1.0));
        assert!((micro_f1(&c) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn all_correct_and_all_wrong() {
        let targets = [1.0, 0.0, 0.0, 1.0];
        let right = count(&targets, &targets, 2, &T);
        assert_eq!(micro_f1(&right), 1.0);
        assert_eq!(macro_f1(&right), Some(1.0));
        let wrong: Vec<f32> = targets.iter().map(|t| 1.0 - t).collect();
        let c = count(&wrong, &targets, 2, &T);
        assert_eq!(micro_f1(&c), 0.0);
        assert_eq!(macro_f1(&c), Some(0.0));
        assert_eq!(c[0].precision(), 0.0);
        assert_eq!(macro_f1(&count(&[0.1], &[0.0], 1, &[0.5])), None);
    }

    #[test]
    fn bce_matches_hand_value() {
        let l = bce(&[0.8, 0.25], &[1.0, 0.0]);
        let expected = -(0.8f64.ln() + 0.75f64.ln()) / 2.0;
        assert!((l - expected).abs() < 1e-6);
        assert!(bce(&[0.0], &[1.0]).is_finite());
    }
}
