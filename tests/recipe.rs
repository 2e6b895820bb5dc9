//! `trainer fit --recipe modern` and its options end to end on the 36 bundled sample images at
//! 32 px, on CPU: resume equals an uninterrupted run with every option on, and each option leaves
//! its mark where users look (results.csv, the checkpoint, stopped.txt).

mod common;

use std::path::Path;
use std::process::Output;

use trainer::model::checkpoint::Checkpoint;
use trainer::train::recipe::{LrSchedule, RecipeSettings};

/// Small runs: 32 px, batch 12, the bundled sample.
const SMALL: [&str; 4] = ["--image-size", "32", "--batch-size", "12"];

fn fit(dir: &Path, args: &[&str]) -> Output {
    common::trainer()
        .current_dir(dir)
        .args(["fit", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

fn rows(run: &Path) -> Vec<Vec<String>> {
    common::results_rows(run).into_iter().skip(1).collect()
}

fn max_abs(t: &tch::Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn every_recipe_option_resumes_exactly_and_shows_in_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let base = [
        SMALL[0],
        SMALL[1],
        SMALL[2],
        SMALL[3],
        "--data",
        data.to_str().unwrap(),
        "--recipe",
        "modern",
        "--ema",
        "0.9",
        "--precise-bn",
        "24",
        "--warmup-epochs",
        "0.5",
        "--patience",
        "50",
        "--pos-weight",
        "auto",
        "--freeze-backbone-epochs",
        "1",
    ];
    let with = |more: &[&'static str]| -> Vec<&str> { base.iter().chain(more).copied().collect() };
    let stderr = common::ok(fit(dir.path(), &with(&["--epochs", "3", "--run", "whole"])));
    let shown = stderr
        .lines()
        .find(|l| l.starts_with("pos_weight (negatives/positives of the training split)"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(shown.matches(", ").count() + 1, 11, "{shown}");

    common::ok(fit(dir.path(), &with(&["--epochs", "1", "--run", "part"])));
    let runs = dir.path().join("runs");
    let first = Checkpoint::read(&runs.join("part/last.ckpt")).unwrap();
    // Epoch 1 trained only the head: the backbone's Adam moments are still zero.
    assert_eq!(max_abs(&first.tensors["adam.m.stem_conv.weight"]), 0.0);
    assert!(max_abs(&first.tensors["adam.m.dense_2.weight"]) > 0.0);
    let stderr = common::ok(fit(dir.path(), &["--resume", "runs/part", "--epochs", "3"]));
    assert!(
        stderr.contains("resuming runs/part after epoch 1"),
        "{stderr}"
    );

    let (a, b) = (
        Checkpoint::read(&runs.join("whole/last.ckpt")).unwrap(),
        Checkpoint::read(&runs.join("part/last.ckpt")).unwrap(),
    );
    assert_eq!((a.meta.epoch, b.meta.epoch), (3, 3));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let diff = max_abs(&(t - &b.tensors[name]));
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
    assert_eq!(
        common::untimed_rows(&runs.join("whole")),
        common::untimed_rows(&runs.join("part"))
    );
    // The backbone trained from epoch 2 on.
    assert!(max_abs(&a.tensors["adam.m.stem_conv.weight"]) > 0.0);

    // The model's tensors are the moving average; the trained ones are kept beside them.
    let (used, trained) = (
        &a.tensors["model.top_conv.weight"],
        &a.tensors["train.top_conv.weight"],
    );
    assert!(max_abs(&(used - trained)) > 0.0);
    // Precise BN: the used statistics are not the trained model's running averages.
    let key = "top_bn.running_var";
    let diff =
        max_abs(&(&a.tensors[&format!("model.{key}")] - &a.tensors[&format!("train.{key}")]));
    assert!(diff > 0.0);

    // The lr column is the rate of each epoch's last step, from the schedule.
    let val = std::fs::read_to_string(runs.join("whole/val.txt")).unwrap();
    let train = 36 - val.lines().count();
    let steps = train.div_ceil(12);
    let schedule = RecipeSettings {
        lr_schedule: LrSchedule::Cosine,
        warmup_epochs: 0.5,
        ..Default::default()
    };
    for row in rows(&runs.join("whole")) {
        let epoch: usize = row[0].parse().unwrap();
        let lr: f64 = row[5].parse().unwrap();
        let want = schedule.lr_at(1e-3, epoch * steps - 1, steps, 3);
        assert!(
            (lr - want).abs() <= 1e-12 * want.max(1.0),
            "epoch {epoch}: {lr} vs {want}"
        );
    }

    // A checkpoint of the recipe runs in infer like any other: the used weights.
    let out = common::trainer()
        .current_dir(dir.path())
        .args([
            "infer",
            "--device",
            "cpu",
            "--weights",
            "runs/whole/best.ckpt",
            "--input",
        ])
        .arg(data.join("stamp"))
        .args(["--output", "tags"])
        .output()
        .unwrap();
    common::succeeded(&out);
    assert!(dir.path().join("tags/stamp.json").is_file());

    // A resume keeps the run's recipe.
    let out = fit(
        dir.path(),
        &["--resume", "runs/part", "--epochs", "4", "--ema", "0.5"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ema"));
}

#[test]
fn early_stopping_ends_the_run_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend([
        "--data",
        data.to_str().unwrap(),
        "--augment",
        "none",
        "--lr",
        "0.01",
        "--patience",
        "1",
        "--epochs",
        "40",
        "--run",
        "p",
    ]);
    let stderr = common::ok(fit(dir.path(), &args));
    let run = dir.path().join("runs/p");
    let reason = std::fs::read_to_string(run.join("stopped.txt")).unwrap();
    assert!(reason.starts_with("early stopping after epoch"), "{reason}");
    assert!(stderr.contains(reason.trim()), "{stderr}");
    let last = Checkpoint::read(&run.join("last.ckpt")).unwrap();
    let best_epoch = last.meta.best_epoch.unwrap();
    assert_eq!(last.meta.epoch, best_epoch + 1, "{reason}");
    assert!(last.meta.epoch < 40);
    assert_eq!(rows(&run).len(), last.meta.epoch);
    // Every epoch after the best had a higher validation loss.
    let losses: Vec<f64> = rows(&run).iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(losses[best_epoch..]
        .iter()
        .all(|&l| l >= losses[best_epoch - 1]));
}
