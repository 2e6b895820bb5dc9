//! `trainer infer` end to end: the real binary on the bundled images, compared with the JSON the
//! original multiinference.py wrote from the same weights.

mod common;

use std::path::Path;

use serde_json::Value;

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Probabilities the oracle computed, by file stem, to judge tags near the threshold.
fn oracle_probs() -> std::collections::HashMap<String, Vec<f64>> {
    let o = common::oracle_json();
    o["probs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, v)| {
            let stem = Path::new(p)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (
                stem,
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

fn tag_map(list: &Value) -> std::collections::BTreeMap<String, f64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["tag"].as_str().unwrap().to_string(),
                t["confidence"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Same images, same tags (a tag within 0.001 of the threshold may differ), confidences within 0.001.
fn assert_same_json(ours: &Value, theirs: &Value, file: &str) {
    let probs = oracle_probs();
    let classes: Vec<String> = common::oracle_json()["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let (ours, theirs) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    let our_keys: Vec<&String> = ours.keys().collect();
    let their_keys: Vec<&String> = theirs.keys().collect();
    assert_eq!(
        our_keys, their_keys,
        "{file}: image keys or their order differ"
    );
    for (stem, their_tags) in theirs {
        let (a, b) = (tag_map(&ours[stem]), tag_map(their_tags));
        for label in a.keys().chain(b.keys()) {
            match (a.get(label), b.get(label)) {
                (Some(x), Some(y)) => assert!(
                    (x - y).abs() <= 0.001 + 1e-9,
                    "{file} {stem} {label}: {x} vs {y}"
                ),
                _ => {
                    let i = classes.iter().position(|c| c == label).unwrap();
                    let p = probs[stem][i];
                    assert!(
                        (p - 0.4).abs() <= 0.001,
                        "{file} {stem}: tag {label} (p={p}) present in only one output"
                    );
                }
            }
        }
    }
}

#[test]
fn infer_reproduces_the_original_json() {
    let out = tempfile::tempdir().unwrap();
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    for input in ["books", "labelled"] {
        let status = common::trainer()
            .args(["infer", "--device", "cpu", "--weights"])
            .arg(&weights)
            .arg("--input")
            .arg(common::sample().join(input))
            .arg("--output")
            .arg(out.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let expected_dir = common::oracle().join("multiinference");
    let mut n = 0;
    for entry in std::fs::read_dir(&expected_dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let ours = read_json(&out.path().join(&name));
        assert_same_json(&ours, &read_json(&path), &name);
        n += 1;
    }
    assert_eq!(n, 10);
    // Nothing but the ten JSON files (no temporary files left behind).
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 10);
}

#[test]
fn unreadable_files_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("in/book1");
    std::fs::create_dir_all(&book).unwrap();
    let good = common::sample().join("labelled/stamp");
    let mut goods = Vec::new();
    for entry in std::fs::read_dir(&good).unwrap().take(2) {
        let p = entry.unwrap().path();
        std::fs::copy(&p, book.join(p.file_name().unwrap())).unwrap();
        goods.push(p.file_stem().unwrap().to_string_lossy().into_owned());
    }
    goods.sort();
    let jpeg = std::fs::read(good.read_dir().unwrap().next().unwrap().unwrap().path()).unwrap();
    std::fs::write(book.join("corrupt.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    let mut garbage = jpeg[..600].to_vec();
    garbage.extend(std::iter::repeat_n(0x5Au8, 4000));
    std::fs::write(book.join("garbage.jpg"), garbage).unwrap();
    std::fs::write(book.join("empty.jpg"), b"").unwrap();
    std::fs::write(book.join("notes.txt"), b"not an image\n").unwrap();
    let out = dir.path().join("out");
    let output = common::trainer()
        .args(["infer", "--device", "cpu", "--weights"])
        .arg(common::oracle().join("ndl_b0_weights.h5"))
        .arg("--input")
        .arg(dir.path().join("in"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for bad in ["corrupt.jpg", "garbage.jpg", "empty.jpg", "notes.txt"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(bad) && l.contains("skipped")),
            "{bad} not reported:\n{stderr}"
        );
    }
    assert!(stderr.contains("tagged 2 images, skipped 4"), "{stderr}");
    let json = read_json(&out.join("book1.json"));
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, goods.iter().collect::<Vec<_>>());
}

fn infer_error(weights: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = common::trainer()
        .args(["infer", "--device", "cpu", "--weights"])
        .arg(weights)
        .arg("--input")
        .arg(common::sample().join("labelled"))
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written when the weights are refused"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn wrong_weights_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("weights.hdf5");
    std::fs::write(&text, b"this is not HDF5").unwrap();
    let err = infer_error(&text);
    assert!(
        err.contains("weights.hdf5") && err.contains("unknown weights format"),
        "{err}"
    );

    let err = infer_error(&dir.path().join("missing.hdf5"));
    assert!(
        err.contains("missing.hdf5") && err.contains("does not exist"),
        "{err}"
    );

    let err = infer_error(&common::oracle().join("b0_notop_weights.h5"));
    assert!(err.contains("only the backbone"), "{err}");
}
