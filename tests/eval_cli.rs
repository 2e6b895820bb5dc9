//! `trainer eval`: metrics checked against independent computations, calibration, pictures.

mod common;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use trainer::data::taxonomy::Taxonomy;
use trainer::eval::report;
use trainer::metrics::implied_parents;

fn run(args: &[&str]) -> String {
    let out = common::trainer().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "trainer {args:?} failed:\n{stderr}");
    stderr
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Targets of the oracle's 36 labelled images from their folder names, and the oracle's
/// probabilities for them.
fn oracle_labelled() -> (Vec<f32>, Vec<f32>) {
    let o = common::oracle_json();
    let t = Taxonomy::ndl();
    let (mut probs, mut targets) = (Vec::new(), Vec::new());
    for (path, p) in o["probs"].as_object().unwrap() {
        let mut parts = path.split('/');
        if parts.next() != Some("labelled") {
            continue;
        }
        let folder = parts.next().unwrap();
        targets.extend(t.target(folder).unwrap());
        probs.extend(
            p.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32),
        );
    }
    assert_eq!(targets.len(), 36 * 11);
    (probs, targets)
}

/// Precision, recall, F1 and AP of one label written out longhand.
fn longhand(scores: &[f32], truth: &[bool], threshold: f32) -> (f64, f64, f64, Option<f64>) {
    let tp = scores
        .iter()
        .zip(truth)
        .filter(|(s, t)| **s > threshold && **t)
        .count() as f64;
    let predicted = scores.iter().filter(|s| **s > threshold).count() as f64;
    let positives = truth.iter().filter(|t| **t).count() as f64;
    let precision = if predicted > 0.0 { tp / predicted } else { 0.0 };
    let recall = if positives > 0.0 { tp / positives } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    // AP as the mean, over positives, of the precision at that positive's rank (no ties here).
    let ap = (positives > 0.0).then(|| {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap());
        let (mut hits, mut sum) = (0.0, 0.0);
        for (rank, &i) in order.iter().enumerate() {
            if truth[i] {
                hits += 1.0;
                sum += hits / (rank as f64 + 1.0);
            }
        }
        sum / positives
    });
    (precision, recall, f1, ap)
}

#[test]
fn report_agrees_with_a_longhand_computation_on_the_oracle_probabilities() {
    let (probs, targets) = oracle_labelled();
    let t = Taxonomy::ndl();
    for threshold in [0.4f32, 0.5, 0.7] {
        let (labels, _, violations) = report(
            &probs,
            &targets,
            &t.labels,
            &[threshold; 11],
            &implied_parents(&t),
        );
        for (l, rep) in labels.iter().enumerate() {
            let scores: Vec<f32> = probs.chunks(11).map(|r| r[l]).collect();
            let truth: Vec<bool> = targets.chunks(11).map(|r| r[l] > 0.5).collect();
            let (p, r, f, ap) = longhand(&scores, &truth, threshold);
            assert!((rep.precision - p).abs() < 1e-12, "{} precision", rep.label);
            assert!((rep.recall - r).abs() < 1e-12, "{} recall", rep.label);
            assert!((rep.f1 - f).abs() < 1e-12, "{} f1", rep.label);
            match (rep.average_precision, ap) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{} AP {a} vs {b}", rep.label),
                (None, None) => {}
                other => panic!("{} AP {other:?}", rep.label),
            }
        }
        // Hierarchy: picture_landmark predicted without picture, counted longhand.
        let (c, p) = (9, 1);
        let expected = probs
            .chunks(11)
            .filter(|r| r[c] > threshold && r[p] <= threshold)
            .count() as u64;
        let v = violations
            .iter()
            .find(|v| v.child == "picture_landmark" && v.parent == "picture")
            .unwrap();
        assert_eq!(v.images, expected);
    }
}

#[test]
fn eval_equals_metrics_from_infer_output_and_draws_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    let (w, d) = (weights.to_str().unwrap(), common::data());
    let out = dir.path().join("eval");
    run(&[
        "eval",
        "--device",
        "cpu",
        "--weights",
        w,
        "--data",
        d.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--review",
        "2",
    ]);
    let dump = dir.path().join("dump");
    run(&[
        "infer",
        "--device",
        "cpu",
        "--weights",
        w,
        "--input",
        d.to_str().unwrap(),
        "--output",
        dump.to_str().unwrap(),
        "--threshold",
        "0",
    ]);

    // Probabilities from the JSON dump, targets from the folder names. The dump has 3 decimals: a
    // value that rounds onto the threshold is taken at full precision from the Keras oracle.
    let oracle = common::oracle_json();
    let full = |folder: &str, stem: &str, l: usize| -> f32 {
        let key = format!("labelled/{folder}/{stem}.jpg");
        oracle["probs"][key.as_str()][l].as_f64().unwrap() as f32
    };
    let t = Taxonomy::ndl();
    let (mut probs, mut targets) = (Vec::new(), Vec::new());
    for folder in t.folders.keys() {
        let file = dump.join(format!("{folder}.json"));
        if !file.exists() {
            continue;
        }
        for (stem, tags) in read_json(&file).as_object().unwrap() {
            let by_label: HashMap<&str, f64> = tags
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    (
                        x["tag"].as_str().unwrap(),
                        x["confidence"].as_f64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(by_label.len(), 11, "--threshold 0 lists every label");
            probs.extend(t.labels.iter().enumerate().map(|(i, l)| {
                let p = by_label[l.as_str()];
                if (p - 0.4).abs() <= 0.0005 {
                    full(folder, stem, i)
                } else {
                    p as f32
                }
            }));
            targets.extend(t.target(folder).unwrap());
        }
    }
    assert_eq!(probs.len(), 36 * 11);
    let rep = read_json(&out.join("eval.json"));
    assert_eq!(rep["images"], 36);
    for (l, label) in rep["labels"].as_array().unwrap().iter().enumerate() {
        let threshold = label["threshold"].as_f64().unwrap() as f32;
        assert_eq!(threshold, 0.4);
        let scores: Vec<f32> = probs.chunks(11).map(|r| r[l]).collect();
        let truth: Vec<bool> = targets.chunks(11).map(|r| r[l] > 0.5).collect();
        let tp = scores
            .iter()
            .zip(&truth)
            .filter(|(s, t)| **s > threshold && **t)
            .count() as u64;
        let fp = scores
            .iter()
            .zip(&truth)
            .filter(|(s, t)| **s > threshold && !**t)
            .count() as u64;
        let fn_ = scores
            .iter()
            .zip(&truth)
            .filter(|(s, t)| **s <= threshold && **t)
            .count() as u64;
        let name = label["label"].as_str().unwrap();
        assert_eq!(
            (
                label["tp"].as_u64().unwrap(),
                label["fp"].as_u64().unwrap(),
                label["fn"].as_u64().unwrap()
            ),
            (tp, fp, fn_),
            "{name}"
        );
        let (p, r, f, ap) = longhand(&scores, &truth, threshold);
        assert!(
            (label["precision"].as_f64().unwrap() - p).abs() < 1e-9,
            "{name}"
        );
        assert!(
            (label["recall"].as_f64().unwrap() - r).abs() < 1e-9,
            "{name}"
        );
        assert!((label["f1"].as_f64().unwrap() - f).abs() < 1e-9, "{name}");
        // The dump has 3 decimals, so ranks can tie where full precision does not.
        match (label["average_precision"].as_f64(), ap) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 0.02, "{name}: AP {a} vs {b}"),
            (None, None) => {}
            other => panic!("{name}: AP {other:?}"),
        }
    }
    common::assert_drawn_png(&out.join("pr_curves.png"), (1000, 800));
    common::assert_drawn_png(&out.join("confusion.png"), (944, 974));
    let review = std::fs::read_to_string(out.join("review.csv")).unwrap();
    assert!(review.lines().count() > 10);
    assert!(review
        .lines()
        .skip(1)
        .all(|l| l.contains("false positive") || l.contains("false negative")));
}

#[test]
fn calibration_never_lowers_f1_and_infer_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let weights = common::oracle().join("ndl_b0_weights.h5");
    let d = common::data();
    let out = dir.path().join("cal");
    run(&[
        "eval",
        "--device",
        "cpu",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--calibrate",
    ]);
    let rep = read_json(&out.join("eval.json"));
    let cal = rep["calibration"].as_array().unwrap();
    assert_eq!(
        cal.len(),
        10,
        "every label with positives (not picture_person)"
    );
    let mut changed = 0;
    for c in cal {
        let (old, new) = (c["old_f1"].as_f64().unwrap(), c["new_f1"].as_f64().unwrap());
        assert!(new >= old, "{c}");
        changed += (c["new_threshold"] != c["old_threshold"]) as usize;
    }
    assert!(changed > 0);
    let ckpt = out.join("ndl_b0_weights.calibrated.ckpt");
    assert_eq!(
        rep["calibrated_checkpoint"].as_str().unwrap(),
        ckpt.to_str().unwrap()
    );

    // Evaluating the calibrated checkpoint gives the calibrated F1s.
    let again = dir.path().join("again");
    run(&[
        "eval",
        "--device",
        "cpu",
        "--weights",
        ckpt.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    let rep2 = read_json(&again.join("eval.json"));
    for c in cal {
        let label = rep2["labels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["label"] == c["label"])
            .unwrap();
        assert_eq!(label["threshold"], c["new_threshold"]);
        assert!((label["f1"].as_f64().unwrap() - c["new_f1"].as_f64().unwrap()).abs() < 1e-12);
    }

    // infer with the calibrated checkpoint lists exactly the labels above their own thresholds.
    let thresholds: HashMap<String, f64> = rep2["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["label"].as_str().unwrap().to_string(),
                l["threshold"].as_f64().unwrap(),
            )
        })
        .collect();
    let (tagged, dump) = (dir.path().join("tagged"), dir.path().join("dump"));
    run(&[
        "infer",
        "--device",
        "cpu",
        "--weights",
        ckpt.to_str().unwrap(),
        "--input",
        d.to_str().unwrap(),
        "--output",
        tagged.to_str().unwrap(),
    ]);
    run(&[
        "infer",
        "--device",
        "cpu",
        "--weights",
        ckpt.to_str().unwrap(),
        "--input",
        d.to_str().unwrap(),
        "--output",
        dump.to_str().unwrap(),
        "--threshold",
        "0",
    ]);
    let mut checked = 0;
    for folder in Taxonomy::ndl().folders.keys() {
        let (a, b) = (
            tagged.join(format!("{folder}.json")),
            dump.join(format!("{folder}.json")),
        );
        if !a.exists() {
            continue;
        }
        let (a, b) = (read_json(&a), read_json(&b));
        for (stem, all) in b.as_object().unwrap() {
            let listed: Vec<&str> = a[stem]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["tag"].as_str().unwrap())
                .collect();
            for t in all.as_array().unwrap() {
                let (label, conf) = (
                    t["tag"].as_str().unwrap(),
                    t["confidence"].as_f64().unwrap(),
                );
                let th = thresholds[label];
                if (conf - th).abs() > 0.001 {
                    assert_eq!(
                        listed.contains(&label),
                        conf > th,
                        "{stem} {label} {conf} vs threshold {th}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 300, "{checked}");
}
