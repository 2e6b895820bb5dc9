//! The CPU dry run of scripts/bench-gpu: the same stages as on a GPU machine (bundle's binary,
//! exact dataset size, fit per batch and precision, infer, kept logs, archive, summary), so the
//! script cannot rot between the rare GPU sessions.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn bench(out: &std::path::Path, budget: &str) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let images = common::sample();
    let output = Command::new(root.join("scripts/bench-gpu"))
        .args(["--trainer", env!("CARGO_BIN_EXE_trainer")])
        .arg("--images")
        .arg(&images)
        .args([
            "--device",
            "cpu",
            "--total",
            "60",
            "--epochs",
            "2",
            "--batches",
            "12",
        ])
        .args([
            "--precisions",
            "fp32,bf16",
            "--image-size",
            "64",
            "--python",
            "none",
            "--graphs",
            "fp32",
        ])
        .args(["--budget", budget])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_gpu_benchmark_runs_every_stage_on_the_cpu_and_keeps_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (ok, text) = bench(&out, "600");
    assert!(ok, "{text}");
    assert!(text.contains("bench-gpu: dataset of 60 images"), "{text}");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for row in [
        "| trainer-fp32 ",
        "| trainer-bf16 ",
        "| trainer-infer-fp32 ",
    ] {
        assert!(summary.contains(row), "{row} missing:\n{summary}");
    }
    assert!(summary.starts_with("device: cpu"), "{summary}");
    for log in ["version", "doctor", "fit_b12_fp32", "fit_b12_bf16", "infer"] {
        assert!(out.join(format!("logs/{log}.log")).is_file(), "{log}.log");
    }
    assert!(summary.contains("of it waiting for decoding)"), "{summary}");
    // The CUDA-graph run is refused on a CPU, clearly, and the benchmark goes on.
    assert!(
        summary.contains("fit_b12_fp32-graphs: failed") && summary.contains("--cuda-graphs on"),
        "{summary}"
    );
    let rows = std::fs::read_to_string(out.join("runs/b12_fp32/results.csv")).unwrap();
    assert_eq!(rows.lines().count(), 3, "two epochs:\n{rows}");
    assert!(
        std::fs::metadata(out.join("bench-gpu-logs.tar.gz"))
            .unwrap()
            .len()
            > 100
    );

    // A budget too small for any stage: each is skipped with a note, and the summary still comes.
    let out = dir.path().join("tight");
    let (_, text) = bench(&out, "5");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("fit_b12_fp32: skipped (budget spent)"),
        "{text}\n{summary}"
    );
}
