//! `trainer export`: ONNX and TorchScript files that onnxruntime and `torch.jit.load` run with the
//! Keras oracle's probabilities (checked by scripts/check_export.py in the torch environment,
//! which also runs `onnx.checker`), and clear refusals that leave no file behind.

mod common;

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};
use trainer::model::LoadedModel;

fn export(weights: &Path, format: &str, out: &Path) -> std::process::Output {
    common::trainer()
        .args(["export", "--format", format, "--weights"])
        .arg(weights)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}

/// Exports both formats and checks them; returns the checker's JSON report.
fn export_and_check(weights: &Path, dir: &Path, expected: Option<&Path>) -> serde_json::Value {
    let (onnx, pt) = (dir.join("model.onnx"), dir.join("model.pt"));
    for (format, path) in [("onnx", &onnx), ("torchscript", &pt)] {
        let out = export(weights, format, path);
        common::succeeded(&out);
    }
    let mut cmd = std::process::Command::new(common::torch_python());
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_export.py"))
        .args([&onnx, &pt, &common::oracle()]);
    if let Some(e) = expected {
        cmd.arg(e);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap()
}

fn assert_close(report: &serde_json::Value) {
    for key in ["onnx_max_diff", "torchscript_max_diff"] {
        for size in ["1", "16", "96"] {
            let d = report[key][size].as_f64().unwrap();
            assert!(d <= 1e-4, "{key} at batch {size}: {d}");
        }
    }
}

#[test]
fn the_keras_model_exported_gives_keras_probabilities_in_onnxruntime_and_torchscript() {
    let dir = tempfile::tempdir().unwrap();
    let report = export_and_check(
        &common::oracle().join("ndl_b0_model.hdf5"),
        dir.path(),
        None,
    );
    assert_close(&report);
    assert!(report["onnx_opset"].as_i64().unwrap() >= 17);
    let labels: Vec<String> = trainer::data::taxonomy::NDL_LABELS
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(report["onnx_labels"], serde_json::json!(labels));
    assert_eq!(report["torchscript_labels"], serde_json::json!(labels));
    assert_eq!(report["onnx_thresholds"], serde_json::json!(vec![0.4; 11]));
    assert_eq!(
        report["onnx_io"],
        serde_json::json!(["images", "probabilities"])
    );
    assert_eq!(report["onnx_preprocessing"]["channel_order"], "BGR");
    assert_eq!(report["onnx_preprocessing"]["image_size"], 224);
}

#[test]
fn a_checkpoint_written_by_fit_exports_with_its_own_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasetpdm");
    let out = common::trainer()
        .current_dir(dir.path())
        .args([
            "fit",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--augment",
            "none",
            "--batch-size",
            "12",
        ])
        .args(["--val-fraction", "0", "--run", "r", "--init"])
        .arg(common::oracle().join("b0_notop_weights.h5"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    common::succeeded(&out);
    let ckpt = dir.path().join("runs/r/best.ckpt");
    // The checkpoint's own probabilities on the oracle inputs, as infer computes them.
    let model = LoadedModel::load(&ckpt, Device::Cpu).unwrap();
    let inputs = Tensor::read_npy(common::oracle().join("inputs_224_bgr_u8.npy")).unwrap();
    let pixels = Vec::<u8>::try_from(inputs.flatten(0, -1)).unwrap();
    let probs = model.predict(&pixels, 96).unwrap();
    let expected = dir.path().join("expected.npy");
    Tensor::from_slice(&probs)
        .view([96, 11])
        .write_npy(&expected)
        .unwrap();
    let report = export_and_check(&ckpt, dir.path(), Some(&expected));
    assert_close(&report);
}

#[test]
fn bad_exports_are_refused_and_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let keras = common::oracle().join("ndl_b0_model.hdf5");
    let out = export(&keras, "tflite", &dir.path().join("m.tflite"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("onnx, torchscript"));
    let out = export(&keras, "onnx", &dir.path().join("missing/m.onnx"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("missing does not exist"),
        "{err}"
    );
    std::fs::write(dir.path().join("bad.h5"), b"\x89HDF\r\n\x1a\nbroken").unwrap();
    let out = export(
        &dir.path().join("bad.h5"),
        "torchscript",
        &dir.path().join("m.pt"),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("bad.h5"), "{err}");
    assert_eq!(common::file_names(dir.path()), ["bad.h5"]);
}
