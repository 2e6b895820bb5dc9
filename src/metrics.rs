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

/// One label's scores and ground truth from row-major probabilities and 0/1 targets.
pub fn label_column(
    probs: &[f32],
    targets: &[f32],
    l: usize,
    n_labels: usize,
) -> (Vec<f32>, Vec<bool>) {
    let scores = probs.chunks_exact(n_labels).map(|r| r[l]).collect();
    let truth = targets
        .chunks_exact(n_labels)
        .map(|r| r[l] >= 0.5)
        .collect();
    (scores, truth)
}

/// The mean of the values, none without any.
pub fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Average precision of one label (scikit-learn's `average_precision_score`): the sum over
/// distinct score thresholds, from high to low, of (recall gain) × precision. `None` when the
/// label has no positive.
pub fn average_precision(scores: &[f32], truth: &[bool]) -> Option<f64> {
    if !truth.iter().any(|t| *t) {
        return None;
    }
    let curve = pr_curve(scores, truth);
    Some(curve.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum())
}

/// The precision-recall curve of one label: (recall, precision) at each distinct threshold, from
/// the highest score down (tied scores enter together), after a starting point (0, 1).
pub fn pr_curve(scores: &[f32], truth: &[bool]) -> Vec<(f64, f64)> {
    let positives = truth.iter().filter(|t| **t).count().max(1);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut curve = vec![(0.0, 1.0)];
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        // Ties by total order, so a NaN score (never equal to itself) still advances.
        while i < order.len() && scores[order[i]].total_cmp(&s).is_eq() {
            if truth[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        curve.push((tp as f64 / positives as f64, tp as f64 / (tp + fp) as f64));
    }
    curve
}

/// The threshold that maximises a label's F1 under the rule `p > t`, ties going to the lower
/// threshold. Candidates are 0, every distinct score and `current` (so the result is never
/// worse than `current`). `None` when the label has no positive.
pub fn best_threshold(scores: &[f32], truth: &[bool], current: f32) -> Option<(f32, f64)> {
    if !truth.iter().any(|t| *t) {
        return None;
    }
    let mut candidates: Vec<f32> = scores.to_vec();
    candidates.push(0.0);
    candidates.push(current);
    candidates.sort_by(f32::total_cmp);
    candidates.dedup();
    // The counts at each candidate from the sorted scores (a binary search each, not a pass
    // over the images: a calibration of many labels on many images stays n log n per label).
    let sorted = |positive: bool| -> Vec<f32> {
        let mut v: Vec<f32> = scores
            .iter()
            .zip(truth)
            .filter(|(s, y)| **y == positive && !s.is_nan())
            .map(|(s, _)| *s)
            .collect();
        v.sort_by(f32::total_cmp);
        v
    };
    let (pos, neg) = (sorted(true), sorted(false));
    let positives = truth.iter().filter(|y| **y).count() as u64;
    let above = |v: &[f32], t: f32| match t.is_nan() {
        true => 0,
        false => (v.len() - v.partition_point(|s| *s <= t)) as u64,
    };
    let f1_at = |t: f32| {
        let (tp, fp) = (above(&pos, t), above(&neg, t));
        Counts {
            tp,
            fp,
            fn_: positives - tp,
            tn: 0,
        }
        .f1()
    };
    let mut best: Option<(f32, f64)> = None;
    for t in candidates {
        let f = f1_at(t);
        if best.is_none_or(|(_, bf)| f > bf) {
            best = Some((t, f));
        }
    }
    best
}

/// Parent relations implied by a taxonomy: `(child, parent)` label indices where every folder
/// that sets the child also sets the parent (`picture_landmark` -> `picture`, ...), in label
/// order. Each label's folders are a bit set, so this takes labels² × folders / 64 word
/// operations, not a search of the folder lists per pair.
pub fn implied_parents(taxonomy: &crate::data::taxonomy::Taxonomy) -> Vec<(usize, usize)> {
    let index: std::collections::HashMap<&str, usize> = taxonomy
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let words = taxonomy.folders.len().div_ceil(64);
    let mut folders_of = vec![vec![0u64; words]; taxonomy.labels.len()];
    for (f, labels) in taxonomy.folders.values().enumerate() {
        for l in labels.iter().filter_map(|l| index.get(l.as_str())) {
            folders_of[*l][f / 64] |= 1 << (f % 64);
        }
    }
    let subset = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x & !y == 0);
    let mut pairs = Vec::new();
    for (c, child) in folders_of.iter().enumerate() {
        if child.iter().all(|w| *w == 0) {
            continue;
        }
        for (p, parent) in folders_of.iter().enumerate() {
            // Skip labels that always co-occur both ways (no hierarchy between them).
            if p != c && subset(child, parent) && !subset(parent, child) {
                pairs.push((c, p));
            }
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: [f32; 2] = [0.5, 0.5];

    #[test]
    fn nan_scores_end_the_curve() {
        // A NaN never equals itself: the tie loop must still move on.
        let curve = pr_curve(&[0.9, f32::NAN, f32::NAN, 0.1], &[true, false, true, false]);
        assert_eq!(curve.len(), 4);
        assert!(average_precision(&[f32::NAN; 3], &[true, false, false]).is_some());
    }

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
    fn average_precision_matches_scikit_learn() {
        // sklearn.metrics.average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.8333...
        let ap = average_precision(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!((ap - 0.8333333333).abs() < 1e-9, "{ap}");
        assert_eq!(average_precision(&[0.3, 0.9], &[true, true]), Some(1.0));
        assert_eq!(average_precision(&[0.3, 0.9], &[false, false]), None);
        // Ties enter together: one positive and one negative at the same score -> 0.5.
        assert_eq!(average_precision(&[0.5, 0.5], &[true, false]), Some(0.5));
    }

    #[test]
    fn best_threshold_maximises_f1_and_prefers_the_lower() {
        let scores = [0.9, 0.8, 0.3, 0.2, 0.1];
        let truth = [true, true, true, false, false];
        let (t, f) = best_threshold(&scores, &truth, 0.5).unwrap();
        assert_eq!(f, 1.0);
        // p > t must include 0.3 and exclude 0.2: the lowest such candidate is 0.2.
        assert_eq!(t, 0.2);
        assert_eq!(best_threshold(&scores, &[false; 5], 0.5), None);
        // Never worse than the current threshold.
        let (_, f2) = best_threshold(&[0.6, 0.4], &[true, false], 0.5).unwrap();
        assert_eq!(f2, 1.0);
    }

    #[test]
    fn ndl_hierarchy() {
        let t = crate::data::taxonomy::Taxonomy::ndl();
        let pairs = implied_parents(&t);
        let name = |i: usize| t.labels[i].as_str();
        let named: Vec<(&str, &str)> = pairs.iter().map(|&(c, p)| (name(c), name(p))).collect();
        assert!(named.contains(&("picture_landmark", "picture")));
        assert!(named.contains(&("picture_landmark", "picture_outdoor")));
        assert!(named.contains(&("graphic_map", "graphic")));
        assert!(!named.contains(&("picture_outdoor", "picture_landmark")));
        assert!(!named.iter().any(|(c, _)| *c == "graphic" || *c == "stamp"));
        assert_eq!(named.len(), 9);
    }

    #[test]
    fn best_threshold_equals_a_full_count_at_every_candidate() {
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for round in 0..200 {
            let n = 1 + round % 40;
            // Coarse scores, so that ties and scores equal to `current` occur.
            let scores: Vec<f32> = (0..n).map(|_| (next() * 8.0).floor() / 8.0).collect();
            let truth: Vec<bool> = (0..n).map(|_| next() < 0.4).collect();
            let current = (next() * 8.0).floor() / 8.0;
            let targets: Vec<f32> = truth.iter().map(|&y| f32::from(u8::from(y))).collect();
            let mut candidates = scores.clone();
            candidates.extend([0.0, current]);
            candidates.sort_by(f32::total_cmp);
            candidates.dedup();
            let mut expected: Option<(f32, f64)> = None;
            for t in candidates {
                let f = count(&scores, &targets, 1, &[t])[0].f1();
                if expected.is_none_or(|(_, bf)| f > bf) {
                    expected = Some((t, f));
                }
            }
            if !truth.contains(&true) {
                expected = None;
            }
            assert_eq!(
                best_threshold(&scores, &truth, current),
                expected,
                "{scores:?} {truth:?}"
            );
        }
    }

    /// The definition, one folder search per pair.
    fn implied_parents_by_search(t: &crate::data::taxonomy::Taxonomy) -> Vec<(usize, usize)> {
        let sets =
            |l: &String| -> Vec<bool> { t.folders.values().map(|ls| ls.contains(l)).collect() };
        let mut pairs = Vec::new();
        for (c, child) in t.labels.iter().enumerate() {
            let sc = sets(child);
            if !sc.contains(&true) {
                continue;
            }
            for (p, parent) in t.labels.iter().enumerate() {
                let sp = sets(parent);
                let sub = |a: &[bool], b: &[bool]| a.iter().zip(b).all(|(x, y)| !x || *y);
                if p != c && sub(&sc, &sp) && !sub(&sp, &sc) {
                    pairs.push((c, p));
                }
            }
        }
        pairs
    }

    #[test]
    fn implied_parents_match_the_definition_on_random_taxonomies() {
        use crate::data::taxonomy::Taxonomy;
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for _ in 0..50 {
            let labels: Vec<String> = (0..1 + next() % 12).map(|i| format!("l{i}")).collect();
            let folders = (0..next() % 70)
                .map(|f| {
                    let ls = labels.iter().filter(|_| next() % 3 == 0).cloned().collect();
                    (format!("f{f}"), ls)
                })
                .collect();
            let t = Taxonomy { labels, folders };
            assert_eq!(implied_parents(&t), implied_parents_by_search(&t));
        }
    }

    #[test]
    fn bce_matches_hand_value() {
        let l = bce(&[0.8, 0.25], &[1.0, 0.0]);
        let expected = -(0.8f64.ln() + 0.75f64.ln()) / 2.0;
        assert!((l - expected).abs() < 1e-6);
        assert!(bce(&[0.0], &[1.0]).is_finite());
    }
}
