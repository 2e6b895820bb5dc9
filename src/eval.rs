//! `trainer eval`: per-label metrics of a model on a labelled dataset, per-label threshold
//! calibration, pictures and a review list of the images most worth a curator's look.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::data::dataset::{self, ImageCache};
use crate::fsutil::{csv_opt, write_atomic};
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

/// One label's scores and ground truth from row-major probabilities and 0/1 targets.
fn label_column(
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
            let (scores, truth) = label_column(probs, targets, l, n_labels);
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
    let violations = hierarchy
        .iter()
        .map(|&(c, p)| {
            let images = probs
                .chunks_exact(n_labels)
                .filter(|r| r[c] > thresholds[c] && r[p] <= thresholds[p])
                .count() as u64;
            Violation {
                child: labels[c].clone(),
                parent: labels[p].clone(),
                images,
            }
        })
        .collect();
    (per_label, counts, violations)
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Runs `eval`: metrics, files, pictures, and optionally calibration.
pub fn run(model: &LoadedModel, opts: &EvalOptions) -> Result<Evaluation> {
    let labels = model.taxonomy.labels.clone();
    let n_labels = labels.len();
    let mut samples = dataset::open_with(&opts.data, &model.taxonomy)?;
    if let Some(run) = &opts.split {
        let list = run.join(crate::train::fit::VAL_LIST);
        let text = std::fs::read_to_string(&list)
            .with_context(|| format!("cannot read {}", list.display()))?;
        let wanted: HashSet<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        samples.retain(|s| {
            wanted.contains(
                s.path
                    .strip_prefix(&opts.data)
                    .unwrap_or(&s.path)
                    .to_string_lossy()
                    .as_ref(),
            )
        });
        if samples.is_empty() {
            bail!(
                "none of the validation images of {} is in {}",
                list.display(),
                opts.data.display()
            );
        }
    }
    let cache = dataset::load_cache(&opts.data, samples, &model.taxonomy, model.image_size)?;
    let n = cache.samples.len();
    let probs = predict_cache(model, &cache, opts.batch_size)?;
    let targets = Vec::<f32>::try_from(cache.targets.flatten(0, -1)).expect("targets");
    let thresholds = match opts.threshold {
        Some(t) => vec![t; n_labels],
        None => model.thresholds.clone(),
    };
    let hierarchy = metrics::implied_parents(&model.taxonomy);
    let (per_label, counts, violations) =
        report(&probs, &targets, &labels, &thresholds, &hierarchy);
    let all_truth: Vec<bool> = targets.iter().map(|t| *t >= 0.5).collect();
    let mut rep = EvalReport {
        weights: opts.weights.display().to_string(),
        data: opts.data.display().to_string(),
        images: n,
        loss: metrics::bce(&probs, &targets),
        micro_f1: metrics::micro_f1(&counts),
        macro_f1: metrics::macro_f1(&counts),
        micro_average_precision: metrics::average_precision(&probs, &all_truth),
        macro_average_precision: mean(per_label.iter().filter_map(|l| l.average_precision)),
        labels: per_label,
        hierarchy_violations: violations,
        calibration: Vec::new(),
        calibrated_checkpoint: None,
    };

    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("cannot create output folder {}", opts.output.display()))?;
    // Pictures.
    let curves: Vec<plots::Series> = (0..n_labels)
        .filter(|&l| rep.labels[l].support > 0)
        .map(|l| {
            let (scores, truth) = label_column(&probs, &targets, l, n_labels);
            let ap = rep.labels[l].average_precision.unwrap_or(0.0);
            (
                format!("{} (AP {ap:.2})", labels[l]),
                metrics::pr_curve(&scores, &truth),
            )
        })
        .collect();
    plots::pr_curves(&opts.output.join("pr_curves.png"), &curves)?;
    let mut co = vec![vec![0u64; n_labels]; n_labels];
    for (p, t) in probs
        .chunks_exact(n_labels)
        .zip(targets.chunks_exact(n_labels))
    {
        for (ti, row) in co.iter_mut().enumerate() {
            if t[ti] >= 0.5 {
                for (pi, cell) in row.iter_mut().enumerate() {
                    if p[pi] > thresholds[pi] {
                        *cell += 1;
                    }
                }
            }
        }
    }
    let note = match opts.threshold {
        Some(t) => format!("threshold {t}"),
        None => "model thresholds".into(),
    };
    plots::confusion(&opts.output.join("confusion.png"), &labels, &co, &note)?;

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
        let mut new_thresholds = thresholds.clone();
        for l in 0..n_labels {
            let (scores, truth) = label_column(&probs, &targets, l, n_labels);
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
        settings: serde_json::json!({ "imported_from": opts.weights.display().to_string() }),
    };
    checkpoint::save(&new_path, &meta, &model.vs, &[])?;
    Ok(new_path)
}

fn eval_csv(rep: &EvalReport) -> String {
    let mut s =
        String::from("label,threshold,precision,recall,f1,support,tp,fp,fn,average_precision\n");
    for l in &rep.labels {
        s += &format!(
            "{},{},{:.6},{:.6},{:.6},{},{},{},{},{}\n",
            l.label,
            l.threshold,
            l.precision,
            l.recall,
            l.f1,
            l.support,
            l.tp,
            l.fp,
            l.fn_,
            csv_opt(l.average_precision)
        );
    }
    s += &format!(
        "micro,,,,{:.6},,,,,{}\n",
        rep.micro_f1,
        csv_opt(rep.micro_average_precision)
    );
    s += &format!(
        "macro,,,,{},,,,,{}\n",
        csv_opt(rep.macro_f1),
        csv_opt(rep.macro_average_precision)
    );
    s
}

/// `review.csv`: per label, the false positives and negatives with the largest loss.
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
        out += &format!(
            "{},{},{},{:.4},{:.4},{},{},{}\n",
            labels[r.label],
            r.rank,
            if r.false_positive {
                "false positive"
            } else {
                "false negative"
            },
            row[r.label],
            r.loss,
            crate::fsutil::csv_field(&cache.samples[i].path.display().to_string()),
            truth.join(";"),
            predicted.join(";")
        );
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
    eprintln!("{} images, loss {:.4}", rep.images, rep.loss);
    eprintln!(
        "  {:width$}  thresh  precision  recall     f1     AP  support",
        "label"
    );
    for l in &rep.labels {
        eprintln!(
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
    eprintln!(
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
        eprintln!("  hierarchy: no child label predicted without its parent");
    } else {
        eprintln!("  hierarchy violations: {}", violations.join("; "));
    }
    if !rep.calibration.is_empty() {
        eprintln!("  calibrated thresholds (F1 on these images):");
        for c in &rep.calibration {
            eprintln!(
                "    {:width$}  {:.3} -> {:.3}   F1 {:.3} -> {:.3}",
                c.label, c.old_threshold, c.new_threshold, c.old_f1, c.new_f1
            );
        }
    }
}

fn fmt3(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}
