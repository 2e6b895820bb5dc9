//! `trainer fit` end to end on the 36 bundled sample images, on CPU.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use tch::{Device, Tensor};
use trainer::data::dataset;
use trainer::metrics;
use trainer::model::arch::Arch;
use trainer::model::{keras, LoadedModel};

fn notop() -> PathBuf {
    common::oracle().join("b0_notop_weights.h5")
}

/// Runs `trainer fit` in `dir` with the given extra arguments.
fn fit(dir: &Path, args: &[&str]) -> Output {
    let out = common::trainer()
        .current_dir(dir)
        .args(["fit", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap();
    out
}

fn fail(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "fit should have failed:\n{stderr}");
    stderr
}

/// Probabilities of a model on every image of the bundled dataset, with the targets.
fn predict_all(model: &LoadedModel) -> (Vec<f32>, Vec<f32>) {
    let (taxonomy, samples) = dataset::open(&common::data(), None).unwrap();
    let cache = dataset::load_cache(&common::data(), samples, &taxonomy, model.image_size).unwrap();
    let n = cache.samples.len();
    let pixels = Vec::<u8>::try_from(cache.pixels.flatten(0, -1)).unwrap();
    let probs = model.predict(&pixels, n).unwrap();
    let targets = Vec::<f32>::try_from(cache.targets.flatten(0, -1)).unwrap();
    (probs, targets)
}

const SMALL: &[&str] = &[
    "--image-size",
    "64",
    "--augment",
    "none",
    "--batch-size",
    "12",
];

#[test]
fn learns_the_sample_from_the_imagenet_style_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let notop = notop();
    let data = common::data();
    let mut args = vec![
        "--data",
        data.to_str().unwrap(),
        "--init",
        notop.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&[
        "--val-fraction",
        "0",
        "--epochs",
        "40",
        "--lr",
        "1e-3",
        "--run",
        "learn",
    ]);
    common::ok(fit(dir.path(), &args));
    let rows = common::results_rows(&dir.path().join("runs/learn"));
    assert_eq!(rows.len(), 41);
    let loss = |r: &Vec<String>| r[1].parse::<f64>().unwrap();
    assert!(
        loss(&rows[40]) < 0.5 * loss(&rows[1]),
        "training loss fell: {} -> {}",
        loss(&rows[1]),
        loss(&rows[40])
    );
    let model = LoadedModel::load(&dir.path().join("runs/learn/best.ckpt"), Device::Cpu).unwrap();
    let (probs, targets) = predict_all(&model);
    let counts = metrics::count(&probs, &targets, 11, &[0.5; 11]);
    let micro = metrics::micro_f1(&counts);
    assert!(micro >= 0.95, "training-set micro-F1 {micro}");
}

#[test]
fn keras_weights_of_a_run_give_the_best_checkpoints_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let (notop, data) = (notop(), common::data());
    let mut args = vec![
        "--data",
        data.to_str().unwrap(),
        "--init",
        notop.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--epochs", "2", "--run", "rt"]);
    common::ok(fit(dir.path(), &args));
    let best = LoadedModel::load(&dir.path().join("runs/rt/best.ckpt"), Device::Cpu).unwrap();
    let best_meta =
        trainer::model::checkpoint::Checkpoint::read(&dir.path().join("runs/rt/best.ckpt"))
            .unwrap()
            .meta;
    let name = format!("val_loss{:.3}.hdf5", best_meta.val_loss.unwrap());
    let hdf5 = dir.path().join("weights_pdm_multi").join(name);
    assert!(hdf5.is_file(), "{} missing", hdf5.display());
    // The Keras file into a fresh model at the run's input size.
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = trainer::model::efficientnet::Tagger::new(&vs.root(), Default::default());
    let report = keras::load(&hdf5, &vs, Arch::B0).unwrap();
    assert!(report.head_loaded);
    let from_keras = LoadedModel {
        vs,
        net,
        taxonomy: best.taxonomy.clone(),
        thresholds: best.thresholds.clone(),
        image_size: 64,
        description: String::new(),
        path: hdf5.clone(),
        precision: trainer::model::precision::Precision::Fp32,
        onnx: None,
    };
    let (a, _) = predict_all(&best);
    let (b, _) = predict_all(&from_keras);
    let diff = (Tensor::from_slice(&a) - Tensor::from_slice(&b))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff <= 1e-5, "max difference {diff}");
}

#[test]
fn resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (notop, data) = (notop(), common::data());
    let mut base = vec![
        "--data",
        data.to_str().unwrap(),
        "--init",
        notop.to_str().unwrap(),
    ];
    base.extend_from_slice(&["--image-size", "64", "--batch-size", "12"]);
    let mut whole = base.clone();
    whole.extend_from_slice(&["--epochs", "4", "--run", "whole"]);
    common::ok(fit(dir.path(), &whole));
    let mut part = base.clone();
    part.extend_from_slice(&["--epochs", "2", "--run", "part"]);
    common::ok(fit(dir.path(), &part));
    let stderr = common::ok(fit(dir.path(), &["--resume", "runs/part", "--epochs", "4"]));
    assert!(
        stderr.contains("resuming runs/part after epoch 2"),
        "{stderr}"
    );

    let read = |run: &str| {
        trainer::model::checkpoint::Checkpoint::read(
            &dir.path().join("runs").join(run).join("last.ckpt"),
        )
        .unwrap()
    };
    let (a, b) = (read("whole"), read("part"));
    assert_eq!(a.meta.epoch, 4);
    assert_eq!(b.meta.epoch, 4);
    for (name, t) in &a.tensors {
        let diff = (t - &b.tensors[name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
    // Same CSV rows, but for the timing columns.
    let (ra, rb) = (
        common::untimed_rows(&dir.path().join("runs/whole")),
        common::untimed_rows(&dir.path().join("runs/part")),
    );
    assert_eq!(ra.len(), 5);
    assert_eq!(ra, rb);
    assert_eq!(
        std::fs::read(dir.path().join("runs/whole/val.txt")).unwrap(),
        std::fs::read(dir.path().join("runs/part/val.txt")).unwrap()
    );
}

fn copy_dataset(to: &Path) {
    for entry in std::fs::read_dir(common::data()).unwrap() {
        let tag = entry.unwrap().path();
        let dst = to.join(tag.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(&tag).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn bad_datasets_and_init_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    copy_dataset(&d);
    let data = d.to_str().unwrap().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--data",
            &data,
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--augment",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        fit(
            dir.path(),
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };

    // A good run first: its folder must survive the failures below untouched.
    common::ok(run(&["--run", "good"]));
    let good = dir.path().join("runs/good");
    let snapshot: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&good)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();

    // A corrupt image is reported by path and left out; training goes on.
    std::fs::write(d.join("stamp/broken.jpg"), b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    let stderr = common::ok(run(&["--run", "with-corrupt"]));
    assert!(
        stderr.contains("broken.jpg") && stderr.contains("skipped"),
        "{stderr}"
    );
    assert!(stderr.contains("36 images"), "{stderr}");

    // Rerunning into an existing run folder is refused.
    let stderr = fail(run(&["--run", "good"]));
    assert!(
        stderr.contains("already holds a run") && stderr.contains("--resume"),
        "{stderr}"
    );

    // An --init file of the wrong architecture names the first bad tensor.
    let wrong = dir.path().join("wrong.h5");
    common::write_hdf5_for_child(&wrong, |scratch| {
        let f = hdf5::File::create(scratch).unwrap();
        let names = [hdf5::types::VarLenAscii::from_ascii("stem_conv").unwrap()];
        f.new_attr::<hdf5::types::VarLenAscii>()
            .shape(1)
            .create("layer_names")
            .unwrap()
            .write_raw(&names)
            .unwrap();
        let g = f.create_group("stem_conv").unwrap();
        let wn = [hdf5::types::VarLenAscii::from_ascii("stem_conv/kernel:0").unwrap()];
        g.new_attr::<hdf5::types::VarLenAscii>()
            .shape(1)
            .create("weight_names")
            .unwrap()
            .write_raw(&wn)
            .unwrap();
        g.create_group("stem_conv")
            .unwrap()
            .new_dataset::<f32>()
            .shape([3, 3, 3, 48])
            .create("kernel:0")
            .unwrap();
    });
    let stderr = fail(run(&[
        "--run",
        "wrong-init",
        "--init",
        wrong.to_str().unwrap(),
    ]));
    assert!(
        stderr.contains("wrong.h5")
            && stderr.contains("stem_conv/stem_conv/kernel:0")
            && stderr.contains("48"),
        "{stderr}"
    );

    // An unknown folder lists the unknown and the known tags.
    std::fs::create_dir_all(d.join("cats")).unwrap();
    std::fs::copy(
        common::sample()
            .join("labelled/stamp")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        d.join("cats/a.jpg"),
    )
    .unwrap();
    let stderr = fail(run(&["--run", "unknown"]));
    assert!(
        stderr.contains("unknown tag folder(s): cats") && stderr.contains("Known tags:"),
        "{stderr}"
    );
    std::fs::remove_dir_all(d.join("cats")).unwrap();

    // A tag folder with no readable image.
    std::fs::create_dir_all(d.join("picture_person")).unwrap();
    std::fs::write(d.join("picture_person/notes.txt"), b"no images here").unwrap();
    let stderr = fail(run(&["--run", "empty-folder"]));
    assert!(
        stderr.contains("picture_person") && stderr.contains("no readable image"),
        "{stderr}"
    );
    std::fs::remove_dir_all(d.join("picture_person")).unwrap();

    // An empty dataset.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("stamp")).unwrap();
    let out = fit(
        dir.path(),
        &["--data", empty.to_str().unwrap(), "--run", "empty"],
    );
    let stderr = fail(out);
    assert!(stderr.contains("empty"), "{stderr}");

    for (p, bytes) in snapshot {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
    // val.txt, settings.json, results.csv, results.png, last.ckpt, best.ckpt, the lock file and
    // the TensorBoard event file.
    assert_eq!(std::fs::read_dir(&good).unwrap().count(), 8);
    let names = common::file_names(&good);
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("events.out.tfevents."))
            .count(),
        1,
        "{names:?}"
    );
}

#[test]
fn fast_paths_run_on_a_cpu_only_machine() {
    let dir = tempfile::tempdir().unwrap();
    let (notop, data) = (notop(), common::data());
    for (run, precision, format) in [
        ("bf16", "bf16", "channels-last"),
        ("fp16", "fp16", "contiguous"),
    ] {
        let args = [
            "--data",
            data.to_str().unwrap(),
            "--init",
            notop.to_str().unwrap(),
            "--image-size",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "12",
            "--precision",
            precision,
            "--memory-format",
            format,
            "--run",
            run,
        ];
        let stderr = common::ok(fit(dir.path(), &args));
        assert!(
            stderr
                .to_lowercase()
                .contains(&format!("precision {precision}")),
            "{stderr}"
        );
        let rows = common::results_rows(&dir.path().join("runs").join(run));
        let loss: f64 = rows[1][1].parse().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{run}: {loss}");
    }
    // CUDA asked for on a machine without it is a clear error, not a silent CPU run.
    if !tch::Cuda::is_available() {
        let out = common::trainer()
            .current_dir(dir.path())
            .args(["fit", "--device", "cuda", "--data", data.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = fail(out);
        assert!(stderr.contains("CUDA is not available"), "{stderr}");
    }
}

#[test]
fn cuda_graphs_are_refused_where_they_cannot_apply_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let data = data.to_str().unwrap();
    let refused = |extra: &[&str]| {
        let mut args = vec!["--data", data, "--cuda-graphs", "on", "--run", "g"];
        args.extend_from_slice(extra);
        fail(fit(dir.path(), &args))
    };
    let stderr = refused(&[]);
    assert!(
        stderr.contains("--cuda-graphs on") && stderr.contains("CUDA"),
        "{stderr}"
    );
    if !tch::Cuda::is_available() {
        assert!(
            stderr.contains("needs a CUDA device") || stderr.contains("built without CUDA graphs"),
            "{stderr}"
        );
    }
    assert!(!dir.path().join("runs").exists(), "nothing written");
    let stderr = fail(fit(dir.path(), &["--cuda-graphs", "maybe"]));
    assert!(
        stderr.contains("--cuda-graphs") && stderr.contains("on"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_keeps_a_resumable_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let child = common::trainer()
        .current_dir(dir.path())
        .args([
            "fit",
            "--device",
            "cpu",
            "--data",
            data.to_str().unwrap(),
            "--image-size",
            "48",
            "--batch-size",
            "6",
            "--epochs",
            "200",
            "--run",
            "stop",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let csv = dir.path().join("runs/stop/results.csv");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&csv)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(start.elapsed().as_secs() < 120, "no epoch finished");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("trainer fit --resume runs/stop"),
        "{stderr}"
    );
    let rows = common::results_rows(&dir.path().join("runs/stop"));
    let last =
        trainer::model::checkpoint::Checkpoint::read(&dir.path().join("runs/stop/last.ckpt"))
            .unwrap();
    assert_eq!(
        last.meta.epoch,
        rows.len() - 1,
        "last.ckpt holds the last epoch of the CSV"
    );
    assert!(std::fs::read_dir(dir.path().join("runs/stop"))
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    let next = (last.meta.epoch + 1).to_string();
    common::ok(fit(
        dir.path(),
        &["--resume", "runs/stop", "--epochs", &next],
    ));
    assert_eq!(
        common::results_rows(&dir.path().join("runs/stop")).len(),
        last.meta.epoch + 2
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let args = [
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "48",
        "--batch-size",
        "6",
        "--augment",
        "none",
        "--epochs",
        "3",
        "--lr",
        "1e30",
        "--run",
        "nan",
    ];
    let stderr = fail(fit(dir.path(), &args));
    assert!(
        stderr.contains("the training loss is NaN") || stderr.contains("the training loss is inf"),
        "{stderr}"
    );
    assert!(stderr.contains("a lower --lr may help"), "{stderr}");
    assert!(!dir.path().join("runs/nan/last.ckpt").exists());
    assert_eq!(
        common::results_rows(&dir.path().join("runs/nan")).len(),
        1,
        "no row for a diverged epoch"
    );
}
