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

/// The B1 oracle: a B1 tagger written by real Keras, at 240 pixels.
pub fn oracle_b1() -> PathBuf {
    shared().join("fixtures/keras-oracle-b1")
}

pub fn sample() -> PathBuf {
    shared().join("data/ndl-sample")
}

/// The oracle's image list (relative to `sample()`), its label list and probabilities.
pub fn oracle_json() -> serde_json::Value {
    oracle_json_of(&oracle())
}

/// The `oracle.json` of the oracle folder `dir`.
pub fn oracle_json_of(dir: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("oracle.json")).expect("oracle.json");
    serde_json::from_str(&text).expect("oracle.json is JSON")
}

pub fn oracle_images() -> Vec<PathBuf> {
    oracle_images_of(&oracle())
}

/// The images of the oracle folder `dir`, in its order.
pub fn oracle_images_of(dir: &std::path::Path) -> Vec<PathBuf> {
    oracle_json_of(dir)["images"]
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

/// The small labelled data set bundled with the repository.
pub fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasetpdm")
}

/// A command's standard error as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that the command succeeded (else shows its standard error).
pub fn succeeded(out: &std::process::Output) {
    assert!(out.status.success(), "the command failed:\n{}", stderr(out));
}

/// Asserts that the command succeeded (else shows its standard error); returns its standard error.
pub fn ok(out: std::process::Output) -> String {
    succeeded(&out);
    stderr(&out)
}

/// The records of a CSV file as Python's `csv` module reads them.
pub fn python_csv(path: &std::path::Path) -> Vec<Vec<String>> {
    let script = "import csv, json, sys\nwith open(sys.argv[1], newline='') as f:\n    print(json.dumps(list(csv.reader(f))))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    succeeded(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The rows of a run's `results.csv` split into fields; the header is the first row.
pub fn results_rows(run: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(run.join("results.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

/// A valid PNG of the given size with real drawing on it: many non-white pixels, some of them
/// coloured (lines or cells, not only black text).
pub fn assert_drawn_png(path: &std::path::Path, size: (u32, u32)) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert!(
        bytes.len() > 10_000,
        "{}: only {} bytes",
        path.display(),
        bytes.len()
    );
    let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), size, "{}", path.display());
    let total = (size.0 * size.1) as usize;
    let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    let coloured = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.max(g).max(b) as i32 - r.min(g).min(b) as i32 > 60
        })
        .count();
    assert!(
        non_white > total / 100,
        "{}: {non_white} drawn pixels of {total}",
        path.display()
    );
    assert!(
        coloured > total / 200,
        "{}: {coloured} coloured pixels of {total}",
        path.display()
    );
}

/// The names of the entries of `dir`, sorted (none when it does not exist).
pub fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The JPEG with its frame header claiming `w` x `h` pixels: a decompression bomb of a few
/// hundred bytes.
pub fn jpeg_claiming(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut bytes = jpeg.to_vec();
    let sof = bytes
        .windows(2)
        .position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1]))
        .expect("a JPEG frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

/// Writes an HDF5 file in this process for a child `trainer` to read. HDF5 opens files without
/// close-on-exec and holds an exclusive `flock` on them, so a `trainer` spawned meanwhile by a
/// test on another thread inherits the lock and a reader of the same inode fails to lock it.
/// The file is written under a scratch name and copied: the copy is a new inode nobody locked.
#[allow(dead_code)]
pub fn write_hdf5_for_child(path: &std::path::Path, write: impl FnOnce(&std::path::Path)) {
    let scratch = path.with_extension("scratch.h5");
    write(&scratch);
    std::fs::copy(&scratch, path).expect("copy the HDF5 file");
    std::fs::remove_file(&scratch).expect("remove the scratch HDF5 file");
}

/// `results.csv` rows of a run without the timing columns (epoch_time_s, train_images_per_s),
/// which differ between two runs of the same computation. The header is the first row.
#[allow(dead_code)]
pub fn untimed_rows(run: &std::path::Path) -> Vec<Vec<String>> {
    results_rows(run)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .enumerate()
                .filter(|(i, _)| *i != 6 && *i != 7)
                .map(|(_, v)| v)
                .collect()
        })
        .collect()
}

/// The metadata of a checkpoint made by a test: epoch 1 of `taxonomy` at `image_size`, with
/// thresholds 0.4 and nothing trained.
pub fn checkpoint_meta(
    taxonomy: trainer::data::taxonomy::Taxonomy,
    image_size: usize,
) -> trainer::model::checkpoint::CheckpointMeta {
    use trainer::model::checkpoint::{self, CheckpointMeta, Preprocessing};
    CheckpointMeta {
        format: checkpoint::FORMAT.into(),
        version: checkpoint::VERSION,
        epoch: 1,
        thresholds: vec![0.4; taxonomy.labels.len()],
        taxonomy,
        preprocessing: Preprocessing::original(image_size),
        drop_connect: 0.2,
        optimizer_step: 0,
        seed: 1,
        val_loss: None,
        best_val_loss: None,
        best_epoch: None,
        settings: serde_json::json!({}),
        history: Vec::new(),
        tensors_sha256: None,
        arch: Default::default(),
    }
}

/// The Python of the torch environment (scripts/env sets VIRTUAL_ENV; scripts/setup installs
/// numpy, onnx, onnxruntime and torch there).
#[allow(dead_code)]
pub fn torch_python() -> PathBuf {
    let env =
        std::env::var_os("VIRTUAL_ENV").expect("run the tests through scripts/test (VIRTUAL_ENV)");
    PathBuf::from(env).join("bin/python")
}
