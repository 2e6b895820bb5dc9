//! TensorBoard's own readers (the `tensorboard` package in the torch environment, installed by
//! scripts/setup; scripts/tensorboard_scalars.py) read back every scalar and hyper-parameter the
//! event writer wrote, including a resumed run's second file in the same folder.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer::train::tensorboard::{self as tb, EventWriter, HParam};

/// What TensorBoard reads from `run_dir` (see the script's doc).
fn read_back(run_dir: &Path) -> Value {
    let out = std::process::Command::new(common::torch_python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/tensorboard_scalars.py"))
        .arg(run_dir)
        .output()
        .unwrap();
    common::succeeded(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `[[tag, step, value], ...]` as sorted triples.
fn triples(v: &Value) -> Vec<(String, i64, f64)> {
    let mut t: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_i64().unwrap(),
                e[2].as_f64().unwrap(),
            )
        })
        .collect();
    t.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    t
}

const LABELS: [&str; 2] = ["map", "東京 photo/1"];

/// One epoch of a run: `steps` per-step records from global step `first`, then the epoch's.
fn epoch(
    w: &mut EventWriter,
    epoch: i64,
    first: i64,
    steps: i64,
    out: &mut Vec<(String, i64, f64)>,
) {
    for s in first..first + steps {
        let loss = 1.0 / s as f64 - 0.25;
        w.scalars(
            s,
            [(tb::TRAIN_LOSS, loss), (tb::TRAIN_LR, 1e-30 * s as f64)],
        )
        .unwrap();
        out.push((tb::TRAIN_LOSS.into(), s, loss));
        out.push((tb::TRAIN_LR.into(), s, 1e-30 * s as f64));
    }
    let mut values: Vec<(String, f64)> = tb::EPOCH_METRICS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                t.to_string(),
                [-3.5, 0.0, 0.1, 123456.789][i] * epoch as f64,
            )
        })
        .collect();
    for (i, l) in LABELS.iter().enumerate() {
        values.push((tb::val_f1(l), 0.01 * (i as f64 + epoch as f64)));
        values.push((tb::val_ap(l), -0.5 / epoch as f64));
    }
    for (tag, v) in &values {
        w.scalar(tag, epoch, *v).unwrap();
        out.push((tag.clone(), epoch, *v));
    }
    w.flush().unwrap();
}

fn assert_same(got: &[(String, i64, f64)], want: &[(String, i64, f64)], reader: &str) {
    assert_eq!(got.len(), want.len(), "{reader}: {got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((&g.0, g.1), (&w.0, w.1), "{reader}");
        // Stored as f32; JSON carries that value in decimal (read back to within an f64 ulp).
        assert_eq!(g.2 as f32, w.2 as f32, "{reader}: {} at {}", g.0, g.1);
    }
}

#[test]
fn tensorboard_reads_every_scalar_and_the_hyper_parameters_of_a_resumed_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let (steps, mut want) = (3, Vec::new());
    let hparams: Vec<(&str, HParam)> = vec![
        ("lr", 1e-3.into()),
        ("batch", 32usize.into()),
        ("arch", "b0".into()),
        ("augment", true.into()),
    ];
    {
        let mut w = EventWriter::create(run).unwrap();
        w.hparams(&hparams, &tb::EPOCH_METRICS).unwrap();
        epoch(&mut w, 1, 1, steps, &mut want);
        epoch(&mut w, 2, 1 + steps, steps, &mut want);
        // Interrupted in epoch 3, after two steps: what the resumed run trains again.
        w.scalar(tb::TRAIN_LOSS, 2 * steps + 1, 99.0).unwrap();
        w.scalar(tb::TRAIN_LOSS, 2 * steps + 2, 98.0).unwrap();
    } // dropped: flushed
    let mut w = EventWriter::resume(run, 2 * steps + 1).unwrap();
    w.hparams(&hparams, &tb::EPOCH_METRICS).unwrap();
    epoch(&mut w, 3, 2 * steps + 1, steps, &mut want);
    drop(w);
    let files = std::fs::read_dir(run).unwrap().count();
    assert_eq!(files, 2);
    want.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));

    let got = read_back(run);
    assert_same(&triples(&got["scalars"]), &want, "EventAccumulator");
    assert_same(&triples(&got["server_scalars"]), &want, "data provider");

    let h = &got["hparams"];
    assert_eq!(h["lr"], 1e-3);
    assert_eq!(h["batch"], 32.0);
    assert_eq!(h["arch"], "b0");
    assert_eq!(h["augment"], true);
    let tab = &got["hparams_tab"];
    let names: Vec<&str> = hparams.iter().map(|(n, _)| *n).collect();
    let mut shown: Vec<&str> = tab["hparams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    shown.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(shown, sorted);
    assert_eq!(tab["metrics"], serde_json::json!(tb::EPOCH_METRICS));
    let sessions = tab["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{tab}");
    assert_eq!(sessions[0]["hparams"], *h);
    // Each metric column holds the last epoch's value.
    for (tag, _, v) in want
        .iter()
        .filter(|t| t.1 == 3 && tb::EPOCH_METRICS.contains(&t.0.as_str()))
    {
        let shown = sessions[0]["metrics"][tag].as_f64().unwrap();
        assert_eq!(shown as f32, *v as f32, "{tag}");
    }
}

#[test]
fn a_writer_never_opens_an_existing_file_or_link() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"keep").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    // Links with every name the writer could pick in the next seconds would be refused by
    // create_new; here one link to a file outside, named like an event file.
    let link = run.join("events.out.tfevents.9999999999.host.1.0");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let w = EventWriter::create(&run).unwrap();
    assert_ne!(w.path(), link);
    drop(w);
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    let missing = EventWriter::create(&run.join("missing")).err().unwrap();
    assert!(format!("{missing:#}").contains("missing"), "{missing:#}");
}

/// The `results.csv` rows of a run, each by column name.
fn results(run: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let rows = common::results_rows(run);
    let (header, rows) = rows.split_first().unwrap();
    rows.iter()
        .map(|r| header.iter().cloned().zip(r.iter().cloned()).collect())
        .collect()
}

#[test]
fn a_fit_run_resumed_writes_every_scalar_of_its_results_csv_for_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let fit = |args: &[&str]| {
        let out = common::trainer()
            .current_dir(dir.path())
            .args(["fit", "--device", "cpu", "--data"])
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        common::succeeded(&out);
    };
    // 36 images, a few held out: the rest in 3 steps of 12 and what remains.
    let first = [
        "--run",
        "tb",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--augment",
        "none",
        "--batch-size",
        "12",
        "--val-fraction",
        "0.1",
    ];
    fit(&first);
    fit(&["--resume", "runs/tb", "--epochs", "3"]);
    let run = dir.path().join("runs/tb");
    let back = read_back(&run);
    let scalars = triples(&back["scalars"]);
    let value = |tag: &str, step: i64| -> f64 {
        let found: Vec<f64> = (scalars.iter())
            .filter(|(t, s, _)| t == tag && *s == step)
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(found.len(), 1, "{tag} at step {step}: {found:?}");
        found[0]
    };
    let rows = results(&run);
    assert_eq!(rows.len(), 3);
    let labels: Vec<String> = (rows[0].keys())
        .filter_map(|k| k.strip_prefix("f1/").map(String::from))
        .collect();
    assert_eq!(labels.len(), 11);
    let close = |a: f64, b: &str, what: &str| {
        let b: f64 = b.parse().unwrap();
        assert!(
            (a - b).abs() <= 1e-5 + 1e-5 * b.abs(),
            "{what}: {a} against {b}"
        );
    };
    let steps = 3;
    let held_out = std::fs::read_to_string(run.join("val.txt"))
        .unwrap()
        .lines()
        .count();
    let train = 36 - held_out as i64;
    let images = [12.0, 12.0, (train - 24) as f64];
    for (i, row) in rows.iter().enumerate() {
        let epoch = i as i64 + 1;
        close(value(tb::VAL_LOSS, epoch), &row["val_loss"], "val_loss");
        close(
            value(tb::VAL_MICRO_F1, epoch),
            &row["val_micro_f1"],
            "micro",
        );
        if !row["val_macro_f1"].is_empty() {
            close(
                value(tb::VAL_MACRO_F1, epoch),
                &row["val_macro_f1"],
                "macro",
            );
        }
        for l in &labels {
            close(value(&tb::val_f1(l), epoch), &row[&format!("f1/{l}")], l);
        }
        // The epoch's last step has the row's learning rate; its steps' losses, weighted by
        // their images, average to the row's training loss.
        let last = epoch * steps;
        close(value(tb::TRAIN_LR, last), &row["lr"], "lr");
        let weighted: f64 = images
            .iter()
            .enumerate()
            .map(|(k, n)| n * value(tb::TRAIN_LOSS, last - 2 + k as i64))
            .sum();
        close(weighted / train as f64, &row["train_loss"], "train_loss");
    }
    // Every step once (the resumed file continues at step 7), and mAP each epoch.
    let losses = scalars
        .iter()
        .filter(|(t, _, _)| t == tb::TRAIN_LOSS)
        .count();
    assert_eq!(losses, 9);
    let maps = scalars.iter().filter(|(t, _, _)| t == tb::VAL_MAP).count();
    assert_eq!(maps, 3);
    assert_eq!(back["hparams"]["arch"], "efficientnet-b0");
    assert_eq!(back["hparams"]["loss"], "bce");
    let events = common::file_names(&run)
        .into_iter()
        .filter(|n| n.starts_with("events.out.tfevents."))
        .count();
    assert_eq!(events, 2, "one file per session");
}
