//! `trainer eval`: per-label metrics of a model on a labelled dataset, per-label threshold
//! calibration, pictures and a review list of the images most worth a curator's look.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::csvfile::{self, outside};
use crate::data::dataset::{self, ImageCache};
use crate::data::split;
use crate::fsutil::write_atomic;
use crate::metrics::{self, Counts};
use crate::model::checkpoint::{self, Checkpoint, CheckpointMeta, Preprocessing};
use crate::model::LoadedModel;
use crate::plots;
use crate::progress;

/// Settings of one `eval` run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub weights: PathBuf,
    pub data: PathBuf,
    /// A run folder: evaluate exactly the images of its `val.txt`.
    pub split: Option<PathBuf>,
    pub output: PathBuf,
    /// One threshold for every label instead of the model's.
    pub threshold: Option<f32>,
    pub calibrate: bool,
    pub in_place: bool,
    /// Images per label and kind of mistake in `review.csv` and the report (0: no review list).
    pub review: usize,
    pub batch_size: usize,
}

/// A misclassified image worth a second look (it may be mislabelled data rather than a model
/// error).
#[derive(Clone, Debug, PartialEq)]
pub struct Review {
    /// The label it is wrong about.
    pub label: usize,
    /// 1 for the worst of that label.
    pub rank: usize,
    /// Predicted without the label (else: the label was missed).
    pub false_positive: bool,
    /// Its binary cross-entropy for that label.
    pub loss: f64,
    /// Index into the evaluated samples.
    pub image: usize,
}

/// What `run` measured, with what the report page needs to show the images.
pub struct Evaluation {
    pub report: EvalReport,
    pub samples: Vec<crate::data::dataset::Sample>,
    /// Row-major (images x labels).
    pub probs: Vec<f32>,
    pub targets: Vec<f32>,
    pub thresholds: Vec<f32>,
    pub review: Vec<Review>,
}

/// Per label, the `n` false positives and the `n` false negatives with the largest loss, worst
/// first.
pub fn review_list(probs: &[f32], targets: &[f32], thresholds: &[f32], n: usize) -> Vec<Review> {
    let n_labels = thresholds.len();
    let images = probs.len() / n_labels.max(1);
    let mut out = Vec::new();
    for (l, &threshold) in thresholds.iter().enumerate() {
        let mut wrong: Vec<Review> = (0..images)
            .filter_map(|i| {
                let (p, t) = (probs[i * n_labels + l], targets[i * n_labels + l] >= 0.5);
                ((p > threshold) != t).then(|| Review {
                    label: l,
                    rank: 0,
                    false_positive: !t,
                    loss: -((if t { p } else { 1.0 - p }) as f64).clamp(1e-7, 1.0).ln(),
                    image: i,
                })
            })
            .collect();
        wrong.sort_by(|a, b| b.loss.total_cmp(&a.loss));
        for fp in [true, false] {
            let kind = wrong.iter().filter(|r| r.false_positive == fp);
            for (rank, r) in kind.take(n).enumerate() {
                out.push(Review {
                    rank: rank + 1,
                    ..r.clone()
                });
            }
        }
    }
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct LabelReport {
    pub label: String,
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    /// Area under the precision-recall curve; null for a label without positives.
    pub average_precision: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub child: String,
    pub parent: String,
    /// Images where the child was predicted without the parent.
    pub images: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub label: String,
    pub old_threshold: f32,
    pub new_threshold: f32,
    pub old_f1: f64,
    pub new_f1: f64,
}

/// Everything `eval` measured (written as `eval.json`).
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub weights: String,
    pub data: String,
    pub images: usize,
    pub loss: f64,
    pub micro_f1: f64,
    pub macro_f1: Option<f64>,
    pub micro_average_precision: Option<f64>,
    pub macro_average_precision: Option<f64>,
    pub labels: Vec<LabelReport>,
    pub hierarchy_violations: Vec<Violation>,
    pub calibration: Vec<Calibration>,
    pub calibrated_checkpoint: Option<String>,
}

/// Probabilities (N x L, row-major) of the model for every cached image.
pub fn predict_cache(model: &LoadedModel, cache: &ImageCache, batch: usize) -> Result<Vec<f32>> {
    let n = cache.samples.len();
    let bar = progress::bar(n as u64, "images");
    bar.set_prefix("predict");
    let mut out = Vec::with_capacity(n * model.taxonomy.labels.len());
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let px = cache
            .pixels
            .narrow(0, start as i64, len as i64)
            .contiguous();
        let bytes = Vec::<u8>::try_from(px.flatten(0, -1))?;
        out.extend(model.predict(&bytes, len)?);
        bar.inc(len as u64);
        start += len;
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Metrics of probabilities against targets at the given thresholds.
pub fn report(
    probs: &[f32],
    targets: &[f32],
    labels: &[String],
    thresholds: &[f32],
    hierarchy: &[(usize, usize)],
) -> (Vec<LabelReport>, Vec<Counts>, Vec<Violation>) {
    let n_labels = labels.len();
    let counts = metrics::count(probs, targets, n_labels, thresholds);
    let per_label = (0..n_labels)
        .map(|l| {
            let (scores, truth) = metrics::label_column(probs, targets, l, n_labels);
            let c = counts[l];
            LabelReport {
                label: labels[l].clone(),
                threshold: thresholds[l],
                precision: c.precision(),
                recall: c.recall(),
                f1: c.f1(),
                support: c.support(),
                tp: c.tp,
                fp: c.fp,
                fn_: c.fn_,
                average_precision: metrics::average_precision(&scores, &truth),
            }
        })
        .collect();
    // As bits, a taxonomy's many (child, parent) pairs cost a few words per pair, not a pass
    // over the images each.
    let (above, at_or_below) = match hierarchy.is_empty() {
        true => (Vec::new(), Vec::new()),
        false => predicted_bits(probs, thresholds),
    };
    let violations = hierarchy
        .iter()
        .map(|&(c, p)| {
            let images = above[c]
                .iter()
                .zip(&at_or_below[p])
                .map(|(a, b)| u64::from((a & b).count_ones()))
                .sum();
            Violation {
                child: labels[c].clone(),
                parent: labels[p].clone(),
                images,
            }
        })
        .collect();
    (per_label, counts, violations)
}

/// Most labels `confusion.png` shows (a cell is 64 pixels wide, so 32 make a 2,288-pixel picture).
pub const MAX_CONFUSION_LABELS: usize = 32;

/// The labels `confusion.png` shows, in label order: all of them up to
/// [`MAX_CONFUSION_LABELS`], else that many with the most positives (then the most predicted).
fn confusion_labels(counts: &[Counts]) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..counts.len()).collect();
    if chosen.len() > MAX_CONFUSION_LABELS {
        use std::cmp::Reverse;
        chosen.sort_by_key(|&l| {
            let c = &counts[l];
            (Reverse(c.support()), Reverse(c.tp + c.fp), l)
        });
        chosen.truncate(MAX_CONFUSION_LABELS);
        chosen.sort_unstable();
    }
    chosen
}

/// `co[t][p]` over the `chosen` labels: images with true label `chosen[t]` that were predicted
/// label `chosen[p]`.
fn co_occurrence(
    probs: &[f32],
    targets: &[f32],
    thresholds: &[f32],
    chosen: &[usize],
) -> Vec<Vec<u64>> {
    let n_labels = thresholds.len();
    let mut co = vec![vec![0u64; chosen.len()]; chosen.len()];
    for (p, t) in probs
        .chunks_exact(n_labels)
        .zip(targets.chunks_exact(n_labels))
    {
        for (row, &ti) in co.iter_mut().zip(chosen) {
            if t[ti] >= 0.5 {
                for (cell, &pi) in row.iter_mut().zip(chosen) {
                    if p[pi] > thresholds[pi] {
                        *cell += 1;
                    }
                }
            }
        }
    }
    co
}

/// Per label, as bits over the images: where `p > threshold`, and where `p <= threshold`.
fn predicted_bits(probs: &[f32], thresholds: &[f32]) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
    let n_labels = thresholds.len();
    let words = (probs.len() / n_labels.max(1)).div_ceil(64);
    let mut above = vec![vec![0u64; words]; n_labels];
    let mut at_or_below = above.clone();
    for (i, row) in probs.chunks_exact(n_labels).enumerate() {
        let bit = 1u64 << (i % 64);
        for (l, (&p, &t)) in row.iter().zip(thresholds).enumerate() {
            if p > t {
                above[l][i / 64] |= bit;
            }
            if p <= t {
                at_or_below[l][i / 64] |= bit;
            }
        }
    }
    (above, at_or_below)
}

/// Runs `eval`: metrics, files, pictures, and optionally calibration.
pub fn run(model: &LoadedModel, opts: &EvalOptions) -> Result<Evaluation> {
    let labels = model.taxonomy.labels.clone();
    let n_labels = labels.len();
    let samples = eval_samples(model, opts)?;
    let cache = dataset::load_cache(&opts.data, samples, &model.taxonomy, model.image_size)?;
    let probs = predict_cache(model, &cache, opts.batch_size)?;
    let targets = Vec::<f32>::try_from(cache.targets.flatten(0, -1)).expect("targets");
    let thresholds = match opts.threshold {
        Some(t) => vec![t; n_labels],
        None => model.thresholds.clone(),
    };
    let hierarchy = metrics::implied_parents(&model.taxonomy);
    let (per_label, counts, violations) =
        report(&probs, &targets, &labels, &thresholds, &hierarchy);
    let images = cache.samples.len();
    let mut rep = eval_report(
        opts, images, &probs, &targets, per_label, &counts, violations,
    );

    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("cannot create output folder {}", opts.output.display()))?;
    // Pictures.
    draw_pr_curves(
        &opts.output.join("pr_curves.png"),
        &rep.labels,
        &probs,
        &targets,
    )?;
    draw_confusion(opts, &labels, &probs, &targets, &thresholds, &counts)?;

    let review = review_list(&probs, &targets, &thresholds, opts.review);
    if opts.review > 0 {
        write_review(
            &opts.output.join("review.csv"),
            &cache,
            &probs,
            &targets,
            &labels,
            &thresholds,
            &review,
        )?;
    }

    if opts.calibrate {
        calibrate(model, opts, &mut rep, &probs, &targets, &thresholds)?;
    }

    write_atomic(
        &opts.output.join("eval.json"),
        serde_json::to_string_pretty(&rep)?.as_bytes(),
    )?;
    write_atomic(&opts.output.join("eval.csv"), eval_csv(&rep).as_bytes())?;
    Ok(Evaluation {
        report: rep,
        samples: cache.samples,
        probs,
        targets,
        thresholds,
        review,
    })
}

/// The samples of `--data` that `eval` looks at: all of them, or with `--split` only those in the
/// run's `val.txt` (an error when none of them is there).
fn eval_samples(model: &LoadedModel, opts: &EvalOptions) -> Result<Vec<dataset::Sample>> {
    let mut samples = dataset::open_with(&opts.data, &model.taxonomy)?;
    if let Some(run) = &opts.split {
        let list = run.join(split::VAL_LIST);
        let wanted = split::read_val_list(&list)?;
        samples.retain(|s| wanted.contains(&split::val_list_entry(&opts.data, &s.path)));
        if samples.is_empty() {
            bail!(
                "none of the validation images of {} is in {}",
                list.display(),
                opts.data.display()
            );
        }
    }
    Ok(samples)
}

/// The report of all images (loss, micro and macro F1 and AP) around the per-label rows and the
/// hierarchy violations; no calibration yet.
fn eval_report(
    opts: &EvalOptions,
    images: usize,
    probs: &[f32],
    targets: &[f32],
    per_label: Vec<LabelReport>,
    counts: &[Counts],
    violations: Vec<Violation>,
) -> EvalReport {
    let all_truth: Vec<bool> = targets.iter().map(|t| *t >= 0.5).collect();
    EvalReport {
        weights: opts.weights.display().to_string(),
        data: opts.data.display().to_string(),
        images,
        loss: metrics::bce(probs, targets),
        micro_f1: metrics::micro_f1(counts),
        macro_f1: metrics::macro_f1(counts),
        micro_average_precision: metrics::average_precision(probs, &all_truth),
        macro_average_precision: metrics::mean(
            per_label.iter().filter_map(|l| l.average_precision),
        ),
        labels: per_label,
        hierarchy_violations: violations,
        calibration: Vec::new(),
        calibrated_checkpoint: None,
    }
}

/// `pr_curves.png`: the precision-recall curve of each label with positives, its AP in the legend.
fn draw_pr_curves(
    path: &Path,
    per_label: &[LabelReport],
    probs: &[f32],
    targets: &[f32],
) -> Result<()> {
    let n_labels = per_label.len();
    let curves: Vec<plots::Series> = (0..n_labels)
        .filter(|&l| per_label[l].support > 0)
        .map(|l| {
            let (scores, truth) = metrics::label_column(probs, targets, l, n_labels);
            let ap = per_label[l].average_precision.unwrap_or(0.0);
            (
                format!("{} (AP {ap:.2})", per_label[l].label),
                metrics::pr_curve(&scores, &truth),
            )
        })
        .collect();
    plots::pr_curves(path, &curves)
}

/// `confusion.png` in the output folder: true against predicted labels over the labels it shows
/// (see [`confusion_labels`]), its note naming the thresholds and any labels left out.
fn draw_confusion(
    opts: &EvalOptions,
    labels: &[String],
    probs: &[f32],
    targets: &[f32],
    thresholds: &[f32],
    counts: &[Counts],
) -> Result<()> {
    let n_labels = labels.len();
    let shown = confusion_labels(counts);
    let co = co_occurrence(probs, targets, thresholds, &shown);
    let mut note = match opts.threshold {
        Some(t) => format!("threshold {t}"),
        None => "model thresholds".into(),
    };
    if shown.len() < n_labels {
        note += &format!(
            "; the {} of {n_labels} labels with the most positives",
            shown.len()
        );
    }
    let shown_labels: Vec<String> = shown.iter().map(|&l| labels[l].clone()).collect();
    plots::confusion(
        &opts.output.join("confusion.png"),
        &shown_labels,
        &co,
        &note,
    )
}

/// `--calibrate`: per label the threshold of best F1 on these images, recorded in the report,
/// and the checkpoint that carries them (see [`save_thresholds`]).
fn calibrate(
    model: &LoadedModel,
    opts: &EvalOptions,
    rep: &mut EvalReport,
    probs: &[f32],
    targets: &[f32],
    thresholds: &[f32],
) -> Result<()> {
    let labels = &model.taxonomy.labels;
    let n_labels = labels.len();
    let mut new_thresholds = thresholds.to_vec();
    for l in 0..n_labels {
        let (scores, truth) = metrics::label_column(probs, targets, l, n_labels);
        if let Some((t, f1)) = metrics::best_threshold(&scores, &truth, thresholds[l]) {
            new_thresholds[l] = t;
            rep.calibration.push(Calibration {
                label: labels[l].clone(),
                old_threshold: thresholds[l],
                new_threshold: t,
                old_f1: rep.labels[l].f1,
                new_f1: f1,
            });
        }
    }
    let path = save_thresholds(model, opts, &new_thresholds)?;
    rep.calibrated_checkpoint = Some(path.display().to_string());
    Ok(())
}

/// Writes the calibrated thresholds: into a copy of our checkpoint (or the checkpoint itself with
/// `--in-place`); a Keras file becomes a new checkpoint of ours carrying them.
fn save_thresholds(model: &LoadedModel, opts: &EvalOptions, thresholds: &[f32]) -> Result<PathBuf> {
    let stem = opts
        .weights
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let new_path = opts.output.join(format!("{stem}.calibrated.ckpt"));
    if Checkpoint::is_checkpoint(&opts.weights) {
        let mut ckpt = Checkpoint::read(&opts.weights)?;
        ckpt.meta.thresholds = thresholds.to_vec();
        let path = if opts.in_place {
            opts.weights.clone()
        } else {
            new_path
        };
        ckpt.write(&path)?;
        return Ok(path);
    }
    if opts.in_place {
        bail!(
            "--in-place: {} is a Keras file, which cannot hold thresholds; leave out --in-place to write {}",
            opts.weights.display(),
            new_path.display()
        );
    }
    let meta = CheckpointMeta {
        format: checkpoint::FORMAT.into(),
        version: checkpoint::VERSION,
        epoch: 0,
        taxonomy: model.taxonomy.clone(),
        preprocessing: Preprocessing::original(model.image_size),
        thresholds: thresholds.to_vec(),
        drop_connect: model.net.config.drop_connect,
        optimizer_step: 0,
        seed: 0,
        val_loss: None,
        best_val_loss: None,
        best_epoch: None,
        history: Vec::new(),
        tensors_sha256: None,
        arch: model.net.config.arch,
        settings: serde_json::json!({ "imported_from": opts.weights.display().to_string() }),
    };
    checkpoint::save(&new_path, &meta, &model.vs, &[])?;
    Ok(new_path)
}

/// `eval.csv`: one row per label (the label neutralised, see [`csvfile`]), then micro and macro.
fn eval_csv(rep: &EvalReport) -> String {
    let mut s =
        String::from("label,threshold,precision,recall,f1,support,tp,fp,fn,average_precision\n");
    for l in &rep.labels {
        s += &csvfile::line([
            outside(&l.label).into_owned(),
            l.threshold.to_string(),
            format!("{:.6}", l.precision),
            format!("{:.6}", l.recall),
            format!("{:.6}", l.f1),
            l.support.to_string(),
            l.tp.to_string(),
            l.fp.to_string(),
            l.fn_.to_string(),
            csvfile::opt(l.average_precision),
        ]);
    }
    let (micro, macro_) = (format!("{:.6}", rep.micro_f1), csvfile::opt(rep.macro_f1));
    for (name, f1, ap) in [
        ("micro", micro, csvfile::opt(rep.micro_average_precision)),
        ("macro", macro_, csvfile::opt(rep.macro_average_precision)),
    ] {
        s += &csvfile::line([name, "", "", "", &f1, "", "", "", "", &ap]);
    }
    s
}

/// `review.csv`: per label, the false positives and negatives with the largest loss (labels and
/// paths neutralised, see [`csvfile`]).
fn write_review(
    path: &Path,
    cache: &ImageCache,
    probs: &[f32],
    targets: &[f32],
    labels: &[String],
    thresholds: &[f32],
    review: &[Review],
) -> Result<()> {
    let n_labels = labels.len();
    let mut out = String::from("label,rank,kind,probability,loss,path,true_labels,predicted\n");
    for r in review {
        let i = r.image;
        let row = &probs[i * n_labels..(i + 1) * n_labels];
        let truth: Vec<&str> = (0..n_labels)
            .filter(|&k| targets[i * n_labels + k] >= 0.5)
            .map(|k| labels[k].as_str())
            .collect();
        let predicted: Vec<String> = (0..n_labels)
            .filter(|&k| row[k] > thresholds[k])
            .map(|k| format!("{}={:.3}", labels[k], row[k]))
            .collect();
        let path = cache.samples[i].path.display().to_string();
        out += &csvfile::line([
            outside(&labels[r.label]).into_owned(),
            r.rank.to_string(),
            if r.false_positive {
                "false positive"
            } else {
                "false negative"
            }
            .into(),
            format!("{:.4}", row[r.label]),
            format!("{:.4}", r.loss),
            outside(&path).into_owned(),
            outside(&truth.join(";")).into_owned(),
            outside(&predicted.join(";")).into_owned(),
        ]);
    }
    write_atomic(path, out.as_bytes())
}

/// The table `eval` prints.
pub fn print_report(rep: &EvalReport) {
    let width = rep
        .labels
        .iter()
        .map(|l| l.label.len())
        .max()
        .unwrap_or(5)
        .max(5);
    crate::errln!("{} images, loss {:.4}", rep.images, rep.loss);
    crate::errln!(
        "  {:width$}  thresh  precision  recall     f1     AP  support",
        "label"
    );
    for l in &rep.labels {
        crate::errln!(
            "  {:width$}  {:>6.3}  {:>9.3}  {:>6.3}  {:>5.3}  {:>5}  {:>7}",
            l.label,
            l.threshold,
            l.precision,
            l.recall,
            l.f1,
            l.average_precision
                .map(|a| format!("{a:.3}"))
                .unwrap_or_else(|| "-".into()),
            l.support
        );
    }
    crate::errln!(
        "  micro-F1 {:.3}  macro-F1 {}  micro-AP {}  macro-AP {}",
        rep.micro_f1,
        fmt3(rep.macro_f1),
        fmt3(rep.micro_average_precision),
        fmt3(rep.macro_average_precision)
    );
    let violations: Vec<String> = rep
        .hierarchy_violations
        .iter()
        .filter(|v| v.images > 0)
        .map(|v| format!("{} without {}: {}", v.child, v.parent, v.images))
        .collect();
    if violations.is_empty() {
        crate::errln!("  hierarchy: no child label predicted without its parent");
    } else {
        const SHOWN: usize = 20;
        let more = match violations.len() > SHOWN {
            true => format!("; and {} more in eval.json", violations.len() - SHOWN),
            false => String::new(),
        };
        crate::errln!(
            "  hierarchy violations: {}{more}",
            violations[..violations.len().min(SHOWN)].join("; ")
        );
    }
    if !rep.calibration.is_empty() {
        crate::errln!("  calibrated thresholds (F1 on these images):");
        for c in &rep.calibration {
            crate::errln!(
                "    {:width$}  {:.3} -> {:.3}   F1 {:.3} -> {:.3}",
                c.label,
                c.old_threshold,
                c.new_threshold,
                c.old_f1,
                c.new_f1
            );
        }
    }
}

fn fmt3(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts_with_support(support: &[u64]) -> Vec<Counts> {
        support
            .iter()
            .map(|&s| Counts {
                tp: s,
                ..Counts::default()
            })
            .collect()
    }

    #[test]
    fn the_confusion_picture_shows_every_label_up_to_the_cap_then_the_most_frequent() {
        let few = counts_with_support(&[0, 3, 1]);
        assert_eq!(confusion_labels(&few), [0, 1, 2]);
        let support: Vec<u64> = (0..1000).map(|l| (l % 97) as u64).collect();
        let chosen = confusion_labels(&counts_with_support(&support));
        assert_eq!(chosen.len(), MAX_CONFUSION_LABELS);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]), "{chosen:?}");
        assert!(chosen.iter().all(|&l| support[l] >= 96 - 4), "{chosen:?}");
        // 2 images, 3 labels; only labels 0 and 2 shown.
        let probs = [0.9, 0.9, 0.1, 0.2, 0.0, 0.8];
        let targets = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let co = co_occurrence(&probs, &targets, &[0.5; 3], &[0, 2]);
        assert_eq!(co, [[1, 0], [0, 1]]);
    }

    #[test]
    fn violations_count_child_without_parent_across_word_boundaries() {
        // 130 images (three 64-bit words), 2 labels; label 1 predicted without label 0 on
        // every third image, one of them exactly at the threshold.
        let mut probs = Vec::new();
        for i in 0..130 {
            let child = if i % 3 == 0 { 0.9 } else { 0.1 };
            let parent = if i % 3 == 0 && i != 129 { 0.2 } else { 0.7 };
            probs.extend([if i == 3 { 0.5 } else { parent }, child]);
        }
        let targets = vec![0.0; probs.len()];
        let labels = vec!["parent".to_string(), "child".to_string()];
        let (_, _, v) = report(&probs, &targets, &labels, &[0.5, 0.5], &[(1, 0)]);
        let expected = probs
            .chunks_exact(2)
            .filter(|r| r[1] > 0.5 && r[0] <= 0.5)
            .count() as u64;
        assert_eq!(expected, 43);
        assert_eq!(v[0].images, expected);
    }

    #[test]
    fn eval_csv_neutralises_labels_and_keeps_plain_rows() {
        let label = |name: &str| LabelReport {
            label: name.into(),
            threshold: 0.4,
            precision: 0.5,
            recall: 1.0,
            f1: 2.0 / 3.0,
            support: 2,
            tp: 2,
            fp: 2,
            fn_: 0,
            average_precision: None,
        };
        let rep = EvalReport {
            weights: "w".into(),
            data: "d".into(),
            images: 4,
            loss: 0.1,
            micro_f1: 0.5,
            macro_f1: None,
            micro_average_precision: Some(0.25),
            macro_average_precision: None,
            labels: vec![label("stamp"), label("=1+1,\"x\"")],
            hierarchy_violations: vec![],
            calibration: vec![],
            calibrated_checkpoint: None,
        };
        let text = eval_csv(&rep);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "stamp,0.4,0.500000,1.000000,0.666667,2,2,2,0,");
        assert_eq!(
            lines[2],
            "\"'=1+1,\"\"x\"\"\",0.4,0.500000,1.000000,0.666667,2,2,2,0,"
        );
        assert_eq!(lines[3], "micro,,,,0.500000,,,,,0.250000");
        assert_eq!(lines[4], "macro,,,,,,,,,");
    }
}
