//! Paths to the shared fixtures and sample data, used by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the repository (override with `TRAINER_SHARED`).
pub fn shared() -> PathBuf {
    std::env::var_os("TRAINER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

pub fn oracle() -> PathBuf {
    shared().join("fixtures/keras-oracle")
}

pub fn sample() -> PathBuf {
    shared().join("data/ndl-sample")
}

/// The oracle's image list (relative to `sample()`), its label list and probabilities.
pub fn oracle_json() -> serde_json::Value {
    let text = std::fs::read_to_string(oracle().join("oracle.json")).expect("oracle.json");
    serde_json::from_str(&text).expect("oracle.json is JSON")
}

pub fn oracle_images() -> Vec<PathBuf> {
    oracle_json()["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|p| sample().join(p.as_str().expect("path")))
        .collect()
}

/// The `trainer` binary built for this test run.
pub fn trainer() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
}
