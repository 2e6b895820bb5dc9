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
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    reproduces_the_original_json(&common::oracle(), &weights, &[]);
}

#[test]
fn infer_of_a_keras_b1_file_reproduces_the_original_json_at_240_on_both_engines() {
    let weights = common::oracle_b1().join("ndl_b1_weights.h5");
    for engine in ["torch", "onnxruntime"] {
        reproduces_the_original_json(&common::oracle_b1(), &weights, &["--engine", engine]);
    }
}

/// `infer` of the sample's books and labelled images with `weights` writes the JSON files the
/// original batch tagger wrote (the oracle folder's `multiinference/`), and nothing else.
fn reproduces_the_original_json(oracle: &Path, weights: &Path, args: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    for input in ["books", "labelled"] {
        let status = common::trainer()
            .args(["infer", "--device", "cpu", "--weights"])
            .arg(weights)
            .arg("--input")
            .arg(common::sample().join(input))
            .arg("--output")
            .arg(out.path())
            .args(args)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let expected_dir = oracle.join("multiinference");
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
    // The summary splits the time: the share the model waited for decoding is within the whole.
    let (total, waiting) = times(&stderr);
    assert!(
        total > 0.0 && (0.0..=total + 0.05).contains(&waiting),
        "{stderr}"
    );
    let json = read_json(&out.join("book1.json"));
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, goods.iter().collect::<Vec<_>>());
}

fn infer_error(weights: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = infer_labelled(weights, &dir.path().join("out"), &[], &[]);
    assert!(!ok);
    assert!(
        !dir.path().join("out").exists(),
        "nothing is written when the weights are refused"
    );
    err
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

/// The seconds of an infer summary, "(T s, ... images/s on ...; W s of it waiting for decoding)":
/// (T, W).
fn times(stderr: &str) -> (f64, f64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("tagged "))
        .expect("a summary line");
    let total = line.split(" (").nth(1).and_then(|r| r.split(' ').next());
    let waiting = line.split("; ").last().and_then(|r| r.split(' ').next());
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<f64>().ok()).expect(line);
    (number(total), number(waiting))
}

/// The number in "tagged N images" of an infer summary.
fn tagged(stderr: &str) -> usize {
    let at = stderr.find("tagged ").expect("a summary line") + "tagged ".len();
    stderr[at..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_stopped_library_run_continues_without_tagging_twice_or_missing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let pages: Vec<std::path::PathBuf> = std::fs::read_dir(common::sample().join("books/1054192"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let (folders, per_folder) = (40, 3);
    for f in 0..folders {
        let book = input.join(format!("pid{f:03}"));
        std::fs::create_dir_all(&book).unwrap();
        for i in 0..per_folder {
            let page = &pages[(f * per_folder + i) % pages.len()];
            std::fs::copy(page, book.join(format!("p{i}.jpg"))).unwrap();
        }
    }
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    let infer = |out: &str| {
        let mut c = common::trainer();
        c.current_dir(dir.path())
            .args(["infer", "--device", "cpu", "--batch-size", "2", "--weights"])
            .arg(&weights)
            .args(["--input", "in", "--output", out]);
        c
    };
    let reference = infer("ref").output().unwrap();
    assert!(reference.status.success());

    // Stopped with Ctrl-C once the first folders are written.
    let child = infer("out")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out");
    let start = std::time::Instant::now();
    while common::file_names(&out).len() < 3 {
        assert!(start.elapsed().as_secs() < 60, "no folder was written");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let first = child.wait_with_output().unwrap();
    let first_err = String::from_utf8_lossy(&first.stderr).into_owned();
    let written = common::file_names(&out);
    assert!(written.iter().all(|n| n.ends_with(".json")), "{written:?}");
    for name in &written {
        assert_eq!(
            read_json(&out.join(name)),
            read_json(&dir.path().join("ref").join(name))
        );
    }

    // Run again: only the folders not written are tagged, and everything ends up there.
    let second = infer("out").output().unwrap();
    let second_err = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(second.status.success(), "{second_err}");
    assert_eq!(
        tagged(&second_err),
        (folders - written.len()) * per_folder,
        "first run:\n{first_err}\nsecond run:\n{second_err}"
    );
    if written.len() < folders {
        assert!(
            second_err.contains(&format!("left out {} folder(s)", written.len())),
            "{second_err}"
        );
    }
    assert_eq!(
        common::file_names(&out),
        common::file_names(&dir.path().join("ref"))
    );
    for name in common::file_names(&out) {
        assert_eq!(
            read_json(&out.join(&name)),
            read_json(&dir.path().join("ref").join(&name))
        );
    }

    // --overwrite tags every folder again.
    let third = infer("out").arg("--overwrite").output().unwrap();
    assert_eq!(
        tagged(&String::from_utf8_lossy(&third.stderr)),
        folders * per_folder
    );
}

#[test]
fn bf16_is_opt_in_and_gives_probabilities_close_to_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    let run = |precision: &str| {
        let out = common::trainer()
            .args([
                "infer",
                "--device",
                "cpu",
                "--threshold",
                "0",
                "--precision",
                precision,
            ])
            .arg("--weights")
            .arg(&weights)
            .arg("--input")
            .arg(common::sample().join("labelled"))
            .arg("--output")
            .arg(dir.path().join(precision))
            .output()
            .unwrap();
        let err = common::ok(out);
        assert!(err.contains(&format!(", {precision}")), "{err}");
    };
    run("fp32");
    run("bf16");
    let (mut sum, mut n) = (0.0, 0);
    for name in common::file_names(&dir.path().join("fp32")) {
        let a = read_json(&dir.path().join("fp32").join(&name));
        let b = read_json(&dir.path().join("bf16").join(&name));
        for (image, tags) in a.as_object().unwrap() {
            let (ta, tb) = (tag_map(tags), tag_map(&b[image]));
            assert_eq!(ta.len(), 11);
            for (label, p) in ta {
                sum += (p - tb[&label]).abs();
                n += 1;
            }
        }
    }
    let mean = sum / n as f64;
    assert_eq!(n, 36 * 11);
    assert!(mean > 0.0 && mean < 0.05, "mean |bf16 - fp32| = {mean}");
}

/// Runs `trainer infer` with `weights` on the labelled sample, with extra arguments and
/// environment; returns whether it succeeded and its standard error.
fn infer_labelled(
    weights: &Path,
    out: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
) -> (bool, String) {
    let mut cmd = common::trainer();
    cmd.args(["infer", "--device", "cpu", "--weights"])
        .arg(weights)
        .arg("--input")
        .arg(common::sample().join("labelled"))
        .arg("--output")
        .arg(out)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn same_files(a: &Path, b: &Path) {
    let names = common::file_names(a);
    assert!(!names.is_empty());
    assert_eq!(names, common::file_names(b));
    for name in names {
        assert_eq!(
            std::fs::read(a.join(&name)).unwrap(),
            std::fs::read(b.join(&name)).unwrap(),
            "{name} differs"
        );
    }
}

#[test]
fn engines_write_the_same_json_and_a_runtime_that_cannot_load_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keras = common::oracle().join("ndl_b0_model.hdf5");
    let (ok, err) = infer_labelled(&keras, &d.join("auto"), &[], &[]);
    assert!(ok && err.contains("fp32 on onnxruntime"), "{err}");
    let (ok, err) = infer_labelled(&keras, &d.join("torch"), &["--engine", "torch"], &[]);
    assert!(ok && err.contains("fp32 on libtorch"), "{err}");
    same_files(&d.join("auto"), &d.join("torch"));

    // Asked for by name, a missing library is an error that names it, before anything is written.
    let missing = d.join("no/libonnxruntime.so");
    let (ok, err) = infer_labelled(
        &keras,
        &d.join("missing"),
        &["--engine", "onnxruntime"],
        &[("ORT_DYLIB_PATH", &missing)],
    );
    assert!(!ok && err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!d.join("missing").exists());

    // Chosen by auto, a file that is no library is named in a note and libtorch tags the images.
    let bogus = d.join("libonnxruntime.so.1.99.0");
    std::fs::write(&bogus, b"not a shared library").unwrap();
    let (ok, err) = infer_labelled(
        &keras,
        &d.join("fallback"),
        &[],
        &[("ORT_DYLIB_PATH", &bogus)],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("note: cannot load ONNX Runtime from")
            && err.contains(&bogus.display().to_string()),
        "{err}"
    );
    assert!(err.contains("fp32 on libtorch"), "{err}");
    same_files(&d.join("auto"), &d.join("fallback"));

    // ONNX Runtime runs the original's fp32 only.
    let (ok, err) = infer_labelled(
        &keras,
        &d.join("bf16"),
        &["--engine", "onnxruntime", "--precision", "bf16"],
        &[],
    );
    assert!(!ok && err.contains("fp32 on the CPU only"), "{err}");
}
