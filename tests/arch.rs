//! `fit --arch`: EfficientNet variants other than B0, trained, checkpointed, resumed, run on both
//! CPU engines and exported; B0 checkpoints stay as they were.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use tch::{nn, Device};
use trainer::model::arch::Arch;
use trainer::model::checkpoint::Checkpoint;
use trainer::model::efficientnet::{Tagger, TaggerConfig};
use trainer::model::keras;
use trainer::train::run_dir::LAST;

use common::{ok, stderr};

/// Runs `trainer <args>` in `dir`.
fn run(dir: &Path, args: &[&str]) -> Output {
    common::trainer()
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// A small CPU run named `run` of `epochs` epochs with the extra `args`.
fn fit(dir: &Path, run_name: &str, epochs: &str, args: &[&str]) -> Output {
    let data = common::data();
    let mut all = vec![
        "fit",
        "--device",
        "cpu",
        "--data",
        data.to_str().unwrap(),
        "--run",
        run_name,
        "--epochs",
        epochs,
        "--image-size",
        "32",
        "--augment",
        "none",
        "--batch-size",
        "12",
    ];
    all.extend_from_slice(args);
    run(dir, &all)
}

/// The trainer metadata of a checkpoint, as JSON.
fn raw_meta(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let text = &header.metadata().as_ref().unwrap()["trainer"];
    serde_json::from_str(text).unwrap()
}

/// `infer` with `--engine engine`, which must report running on `shown`.
fn infer(dir: &Path, weights: &Path, out: &str, engine: &str, shown: &str) -> PathBuf {
    let input = common::sample().join("labelled");
    let w = weights.to_str().unwrap();
    let i = input.to_str().unwrap();
    let args = [
        "infer",
        "--device",
        "cpu",
        "--weights",
        w,
        "--input",
        i,
        "--output",
        out,
        "--engine",
        engine,
    ];
    let err = ok(run(dir, &args));
    assert!(err.contains(&format!("fp32 on {shown}")), "{err}");
    dir.join(out)
}

fn same_files(a: &Path, b: &Path) {
    let names = common::file_names(a);
    assert!(!names.is_empty());
    assert_eq!(names, common::file_names(b));
    for name in names {
        let (x, y) = (std::fs::read(a.join(&name)), std::fs::read(b.join(&name)));
        assert_eq!(x.unwrap(), y.unwrap(), "{name} differs");
    }
}

#[test]
fn a_b1_run_records_its_arch_runs_on_both_engines_exports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(fit(d, "b1", "1", &["--arch", "efficientnet-b1"]));
    let last = d.join("runs/b1").join(LAST);
    let ckpt = Checkpoint::read(&last).unwrap();
    assert_eq!(ckpt.meta.arch, Arch::B1);
    assert_eq!(raw_meta(&last)["settings"]["arch"], "efficientnet-b1");
    // B1 has 23 blocks (B0 16): block2c is one of B1's own.
    assert!(ckpt.tensors.keys().any(|k| k.starts_with("model.block2c_")));

    // The Keras weights of the best epoch hold B1's layers and load into a B1 tagger.
    let weights: Vec<_> = std::fs::read_dir(d.join("weights_pdm_multi"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(weights.len(), 1, "{weights:?}");
    let vs = nn::VarStore::new(Device::Cpu);
    let config = TaggerConfig {
        arch: Arch::B1,
        ..Default::default()
    };
    let _net = Tagger::new(&vs.root(), config);
    let report = keras::load(&weights[0], &vs, Arch::B1).unwrap();
    assert!(report.head_loaded);
    assert_eq!(report.applied, vs.variables().len());

    let torch = infer(d, &last, "torch", "torch", "libtorch");
    let ort = infer(d, &last, "ort", "onnxruntime", "onnxruntime");
    same_files(&torch, &ort);

    let onnx = d.join("b1.onnx");
    let out = run(
        d,
        &[
            "export",
            "--format",
            "onnx",
            "--weights",
            last.to_str().unwrap(),
            "--output",
            onnx.to_str().unwrap(),
        ],
    );
    ok(out);
    assert!(std::fs::metadata(&onnx).unwrap().len() > 1_000_000);

    // A resume keeps the run's arch and refuses another.
    let resume = [
        "fit", "--device", "cpu", "--resume", "runs/b1", "--epochs", "2",
    ];
    let mut other = resume.to_vec();
    other.extend(["--arch", "efficientnet-b3"]);
    let out = run(d, &other);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--arch"), "{}", stderr(&out));
    ok(run(d, &resume));
    let resumed = Checkpoint::read(&last).unwrap();
    assert_eq!((resumed.meta.epoch, resumed.meta.arch), (2, Arch::B1));

    // An unknown architecture in the metadata is refused, naming the file and the field.
    let bytes = std::fs::read(&last).unwrap();
    let from = br#"\"arch\":\"efficientnet-b1\""#;
    let to = br#"\"arch\":\"efficientnet-b9\""#;
    // The last one: the checkpoint's own field (the first is that of the settings).
    let at = bytes.windows(from.len()).rposition(|w| w == from).unwrap();
    let mut edited = bytes.clone();
    edited[at..at + to.len()].copy_from_slice(to);
    let b9 = d.join("b9.ckpt");
    std::fs::write(&b9, edited).unwrap();
    let input = common::sample().join("labelled");
    let w = b9.to_str().unwrap();
    let args = ["infer", "--device", "cpu", "--weights", w, "--input"];
    let out = run(
        d,
        &[&args[..], &[input.to_str().unwrap(), "--output", "b9"]].concat(),
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(w) && err.contains("field arch"), "{err}");
    assert!(err.contains("efficientnet-b9"), "{err}");
    assert!(!d.join("b9").exists());
}

#[test]
fn a_b3_run_records_its_arch() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = resumes_exactly_and_exports(dir.path(), Arch::B3, &["--recipe", "modern"]);
    // B3's stem has 40 filters (B0 32).
    assert_eq!(ckpt.tensors["model.stem_conv.weight"].size()[0], 40);
}

#[test]
fn a_b1_run_resumes_exactly_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = resumes_exactly_and_exports(dir.path(), Arch::B1, &[]);
    assert_eq!(ckpt.tensors["model.stem_conv.weight"].size()[0], 32);
}

#[test]
fn a_b1_run_trains_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--arch", "efficientnet-b1", "--nproc-per-node", "2"];
    let err = ok(fit(dir.path(), "two", "1", &args));
    assert!(err.contains("starting 2 ranks"), "{err}");
    let ckpt = Checkpoint::read(&dir.path().join("runs/two").join(LAST)).unwrap();
    assert_eq!((ckpt.meta.epoch, ckpt.meta.arch), (1, Arch::B1));
}

/// A run of `arch` (with `extra` options) of two epochs and one of one epoch resumed to two end
/// with the same weights and rows, recording the arch; its ONNX and TorchScript exports give the checkpoint's own
/// probabilities (as `infer` computes them) on 96 images at the run's 32 pixels. Returns the
/// checkpoint.
fn resumes_exactly_and_exports(d: &Path, arch: Arch, extra: &[&str]) -> Checkpoint {
    let arch_args = [&["--arch", arch.name()], extra].concat();
    ok(fit(d, "whole", "2", &arch_args));
    ok(fit(d, "part", "1", &arch_args));
    let resume = [
        "fit",
        "--device",
        "cpu",
        "--resume",
        "runs/part",
        "--epochs",
        "2",
    ];
    ok(run(d, &resume));
    let read = |run: &str| Checkpoint::read(&d.join("runs").join(run).join(LAST)).unwrap();
    let (a, b) = (read("whole"), read("part"));
    assert_eq!((a.meta.epoch, a.meta.arch), (2, arch));
    assert_eq!((b.meta.epoch, b.meta.arch), (2, arch));
    for (name, t) in &a.tensors {
        let diff = (t - &b.tensors[name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{arch}: {name} differs by {diff}");
    }
    let rows = |run: &str| common::untimed_rows(&d.join("runs").join(run));
    assert_eq!(rows("whole").len(), 3);
    assert_eq!(rows("whole"), rows("part"));

    let last = d.join("runs/whole").join(LAST);
    let model = trainer::model::LoadedModel::load(&last, Device::Cpu).unwrap();
    let mut pixels = Vec::new();
    for image in common::oracle_images() {
        pixels.extend(trainer::data::decode::load_resized(&image, 32).unwrap());
    }
    let probs = model.predict(&pixels, 96).unwrap();
    let inputs = d.join("inputs.npy");
    let expected = d.join("expected.npy");
    tch::Tensor::from_slice(&pixels)
        .view([96, 32, 32, 3])
        .write_npy(&inputs)
        .unwrap();
    tch::Tensor::from_slice(&probs)
        .view([96, 11])
        .write_npy(&expected)
        .unwrap();
    let (onnx, pt) = (d.join("m.onnx"), d.join("m.pt"));
    for (format, file) in [("onnx", &onnx), ("torchscript", &pt)] {
        let w = last.to_str().unwrap();
        let args = ["export", "--format", format, "--weights", w, "--output"];
        ok(run(d, &[&args[..], &[file.to_str().unwrap()]].concat()));
    }
    let check = std::process::Command::new(common::torch_python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_export.py"))
        .args([&onnx, &pt, &common::oracle(), &expected, &inputs])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{arch}: {report}\n{}",
        stderr(&check)
    );
    eprintln!("{arch}: {report}");
    a
}

#[test]
fn a_b0_checkpoint_does_not_record_the_arch() {
    let dir = tempfile::tempdir().unwrap();
    ok(fit(dir.path(), "b0", "1", &[]));
    let meta = raw_meta(&dir.path().join("runs/b0").join(LAST));
    assert!(meta.get("arch").is_none(), "{meta}");
    assert!(meta["settings"].get("arch").is_none(), "{meta}");
    assert!(meta["settings"].get("image_size").is_some(), "{meta}");
}

#[test]
fn a_b0_keras_file_is_refused_as_init_of_another_variant() {
    let dir = tempfile::tempdir().unwrap();
    let notop = common::oracle().join("b0_notop_weights.h5");
    let args = [
        "--arch",
        "efficientnet-b1",
        "--init",
        notop.to_str().unwrap(),
    ];
    let out = fit(dir.path(), "b1", "1", &args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(notop.to_str().unwrap()), "{err}");
    assert!(
        err.contains("holds efficientnet-b0 weights, not efficientnet-b1"),
        "{err}"
    );
}
