//! Hostile inputs against `infer`, `eval` and `fit`: files generated here (decompression bombs,
//! broken links, damaged or edited checkpoints, NaN weights), colliding outputs, concurrent runs
//! and out-of-range options. Each must give a clear message naming the file or option, keep the
//! rest of the job going where it can, and leave nothing half-written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use tch::{nn, Device};
use trainer::data::taxonomy::Taxonomy;
use trainer::model::checkpoint::{self, Checkpoint, CheckpointMeta};
use trainer::model::efficientnet::{Tagger, TaggerConfig};

fn keras_model() -> PathBuf {
    common::oracle().join("ndl_b0_model.hdf5")
}

/// The first JPEG of the bundled dataset.
fn a_jpeg() -> PathBuf {
    let dir = common::data().join("stamp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.remove(0)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    common::trainer()
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn infer(dir: &Path, weights: &Path, input: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "infer",
        "--device",
        "cpu",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "out",
    ];
    args.extend(extra);
    run(dir, &args)
}

/// A JPEG whose frame header claims `w` x `h` pixels (a few hundred bytes on disk).
fn jpeg_bomb(w: u16, h: u16) -> Vec<u8> {
    common::jpeg_claiming(&std::fs::read(a_jpeg()).unwrap(), w, h)
}

#[test]
fn decompression_bombs_are_skipped_by_path_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("in/book");
    std::fs::create_dir_all(&book).unwrap();
    std::fs::copy(a_jpeg(), book.join("good.jpg")).unwrap();
    std::fs::write(book.join("bomb.jpg"), jpeg_bomb(65000, 65000)).unwrap();
    let out = infer(dir.path(), &keras_model(), &dir.path().join("in"), &[]);
    let err = common::ok(out);
    assert!(
        err.contains("bomb.jpg") && err.contains("65000x65000"),
        "{err}"
    );
    assert!(err.contains("tagged 1 images, skipped 1"), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/book.json")).unwrap())
            .unwrap();
    assert!(json.get("good").is_some() && json.get("bomb").is_none());

    // The limit is the user's: below the good image's size, it is refused too.
    let out = infer(
        dir.path(),
        &keras_model(),
        &dir.path().join("in"),
        &["--max-pixels", "1000", "--overwrite"],
    );
    let err = common::stderr(&out);
    assert!(err.contains("tagged 0 images, skipped 2"), "{err}");
    assert!(err.contains("more than the limit of 1000 pixels"), "{err}");
}

#[test]
fn broken_links_loops_and_pipes_are_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("in/book");
    std::fs::create_dir_all(&book).unwrap();
    std::fs::copy(a_jpeg(), book.join("good.jpg")).unwrap();
    std::os::unix::fs::symlink(book.join("missing.jpg"), book.join("dangling.jpg")).unwrap();
    std::os::unix::fs::symlink(book.join("loop_b.jpg"), book.join("loop_a.jpg")).unwrap();
    std::os::unix::fs::symlink(book.join("loop_a.jpg"), book.join("loop_b.jpg")).unwrap();
    let fifo = book.join("pipe.jpg");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = infer(dir.path(), &keras_model(), &dir.path().join("in"), &[]);
    let err = common::ok(out);
    for name in ["dangling.jpg", "loop_a.jpg", "loop_b.jpg"] {
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not reported:\n{err}"));
        assert!(line.contains("symbolic link"), "{line}");
    }
    assert!(
        err.contains("pipe.jpg: not a readable image (not a regular file)"),
        "{err}"
    );
    assert!(err.contains("tagged 1 images, skipped 4"), "{err}");

    // The same in a training dataset: reported by path, left out, the rest used.
    let data_copy = dir.path().join("data");
    for entry in std::fs::read_dir(common::data()).unwrap().flatten() {
        let to = data_copy.join(entry.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(entry.path()).unwrap().flatten() {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    std::os::unix::fs::symlink("/nonexistent.jpg", data_copy.join("stamp/dangling.jpg")).unwrap();
    std::fs::write(data_copy.join("stamp/bomb.jpg"), jpeg_bomb(65000, 65000)).unwrap();
    let out = run(
        dir.path(),
        &[
            "eval",
            "--device",
            "cpu",
            "--weights",
            keras_model().to_str().unwrap(),
            "--data",
            data_copy.to_str().unwrap(),
            "--output",
            "eval",
        ],
    );
    let err = common::ok(out);
    assert!(
        err.contains("stamp/dangling.jpg: not a readable image (broken or looping symbolic link"),
        "{err}"
    );
    assert!(
        err.contains("stamp/bomb.jpg: not a readable image (65000x65000"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/eval.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["images"], 36,
        "the bundled 36 images, without the two bad files"
    );
}

#[test]
fn loose_images_and_a_subfolder_of_the_same_name_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("scans");
    std::fs::create_dir_all(input.join("scans")).unwrap();
    std::fs::create_dir_all(input.join("other")).unwrap();
    std::fs::copy(a_jpeg(), input.join("loose.jpg")).unwrap();
    std::fs::copy(a_jpeg(), input.join("scans/inner.jpg")).unwrap();
    std::fs::copy(a_jpeg(), input.join("other/x.jpg")).unwrap();
    let out = infer(dir.path(), &keras_model(), &input, &[]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("loose images and its subfolder scans/ would both be written to scans.json"),
        "{err}"
    );
    assert!(common::file_names(&dir.path().join("out")).is_empty());
}

/// A freshly initialised tagger (NDL labels), written as a checkpoint with `edit` applied to its
/// metadata and `poison` to its variables.
fn checkpoint_with(
    path: &Path,
    edit: impl FnOnce(&mut CheckpointMeta),
    poison: impl FnOnce(&nn::VarStore),
) {
    let taxonomy = Taxonomy::ndl();
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Tagger::new(
        &vs.root(),
        TaggerConfig {
            num_classes: taxonomy.labels.len() as i64,
            ..Default::default()
        },
    );
    poison(&vs);
    let mut meta = common::checkpoint_meta(taxonomy, 64);
    edit(&mut meta);
    checkpoint::save(path, &meta, &vs, &[]).unwrap();
}

fn a_book(dir: &Path) -> PathBuf {
    let book = dir.join("in/book");
    std::fs::create_dir_all(&book).unwrap();
    std::fs::copy(a_jpeg(), book.join("a.jpg")).unwrap();
    dir.join("in")
}

#[test]
fn edited_checkpoint_metadata_is_refused_with_the_field_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = a_book(dir.path());
    let good = dir.path().join("good.ckpt");
    checkpoint_with(&good, |_| {}, |_| {});
    let out = infer(dir.path(), &good, &input, &[]);
    common::succeeded(&out);

    type Edit = Box<dyn FnOnce(&mut CheckpointMeta)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "size0",
            Box::new(|m| m.preprocessing.image_size = 0),
            "preprocessing.image_size is 0",
        ),
        (
            "size_huge",
            Box::new(|m| m.preprocessing.image_size = 100_000),
            "preprocessing.image_size is 100000",
        ),
        (
            "short_thresholds",
            Box::new(|m| m.thresholds.truncate(3)),
            "thresholds has 3 values for 11 labels",
        ),
        (
            "threshold_range",
            Box::new(|m| m.thresholds[2] = 1.5),
            "thresholds holds 1.5",
        ),
        (
            "dup_labels",
            Box::new(|m| m.taxonomy.labels[1] = m.taxonomy.labels[0].clone()),
            "taxonomy.labels lists 'graphic' twice",
        ),
        (
            "best_epoch",
            Box::new(|m| m.best_epoch = Some(usize::MAX)),
            "best_epoch 18446744073709551615 is after epoch 1",
        ),
        (
            "rgb",
            Box::new(|m| m.preprocessing.channel_order = "RGB".into()),
            "preprocessing.channel_order is 'RGB'",
        ),
        (
            "scale",
            Box::new(|m| m.preprocessing.scale = 1.0),
            "preprocessing.scale is 1",
        ),
        (
            "resize",
            Box::new(|m| m.preprocessing.resize = "nearest".into()),
            "preprocessing.resize is 'nearest'",
        ),
    ];
    for (name, edit, expected) in cases {
        let path = dir.path().join(format!("{name}.ckpt"));
        checkpoint_with(&path, edit, |_| {});
        for command in ["infer", "eval"] {
            let out = if command == "infer" {
                infer(dir.path(), &path, &input, &[])
            } else {
                run(
                    dir.path(),
                    &[
                        "eval",
                        "--device",
                        "cpu",
                        "--weights",
                        path.to_str().unwrap(),
                        "--data",
                        common::data().to_str().unwrap(),
                        "--output",
                        "eval_out",
                    ],
                )
            };
            let err = common::stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{name} {command}: {err}");
            assert!(
                err.contains(&format!("{name}.ckpt: bad metadata: {expected}")),
                "{name} {command}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    assert_eq!(common::file_names(&dir.path().join("out")), ["book.json"]);
    assert!(!dir.path().join("eval_out").exists());
}

#[test]
fn a_flipped_byte_in_a_checkpoint_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let input = a_book(dir.path());
    let path = dir.path().join("flipped.ckpt");
    checkpoint_with(&path, |_| {}, |_| {});
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let out = infer(dir.path(), &path, &input, &[]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("flipped.ckpt: the tensors do not match their checksum"),
        "{err}"
    );
    assert!(Checkpoint::read(&path).is_err());
}

#[test]
fn nan_weights_are_refused_naming_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let input = a_book(dir.path());
    let poison = |vs: &nn::VarStore| {
        let vars = vs.variables();
        let (_, t) = vars
            .iter()
            .find(|(k, _)| k.contains("top_conv"))
            .expect("top_conv");
        tch::no_grad(|| {
            let _ = t.shallow_clone().fill_(f64::NAN);
        });
    };
    let ckpt = dir.path().join("nan.ckpt");
    checkpoint_with(&ckpt, |_| {}, poison);
    let out = infer(dir.path(), &ckpt, &input, &[]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("nan.ckpt: tensor") && err.contains("top_conv") && err.contains("not finite"),
        "{err}"
    );
    assert!(common::file_names(&dir.path().join("out")).is_empty());

    // The same weights as a Keras file.
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Tagger::new(
        &vs.root(),
        TaggerConfig {
            num_classes: 11,
            ..Default::default()
        },
    );
    poison(&vs);
    let h5 = dir.path().join("nan.hdf5");
    common::write_hdf5_for_child(&h5, |scratch| {
        trainer::model::keras::save_weights(&vs, trainer::model::arch::Arch::B0, scratch).unwrap()
    });
    let out = infer(dir.path(), &h5, &input, &[]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("nan.hdf5: tensor") && err.contains("not finite"),
        "{err}"
    );
}

#[test]
fn weights_locked_by_a_writer_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let input = a_book(dir.path());
    let weights = dir.path().join("busy.hdf5");
    std::fs::copy(keras_model(), &weights).unwrap();
    // A writer's exclusive lock, as HDF5 itself takes it (flock).
    let writer = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&weights)
        .unwrap();
    writer.lock().unwrap();
    let out = infer(dir.path(), &weights, &input, &[]);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("busy.hdf5") && err.contains("HDF5_USE_FILE_LOCKING=FALSE"),
        "{err}"
    );
    let out = common::trainer()
        .current_dir(dir.path())
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .args(["infer", "--device", "cpu", "--weights"])
        .arg(&weights)
        .arg("--input")
        .arg(&input)
        .args(["--output", "out"])
        .output()
        .unwrap();
    common::succeeded(&out);
    drop(writer);
}

#[test]
fn out_of_range_options_are_refused_with_their_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["fit", "--lr=-1"], "(0, inf)"),
        (&["fit", "--lr", "-1"], "(0, inf)"),
        (&["fit", "--lr", "nan"], "(0, inf)"),
        (&["fit", "--epochs", "0"], "[1, 1000000]"),
        (&["fit", "--batch-size", "0"], "1..=4096"),
        (&["fit", "--val-fraction", "1"], "[0, 1)"),
        (&["fit", "--drop-connect", "-0.5"], "[0, 1)"),
        (&["fit", "--image-size", "100000"], "32..=2048"),
        (&["fit", "--run", "../escape"], "not a run name"),
        (
            &[
                "infer",
                "-w",
                "x",
                "-i",
                "x",
                "-o",
                "x",
                "--threshold",
                "-1",
            ],
            "[0, 1)",
        ),
        (
            &[
                "infer",
                "-w",
                "x",
                "-i",
                "x",
                "-o",
                "x",
                "--max-pixels",
                "0",
            ],
            "1..=4294967296",
        ),
        (&["fetch", "--tag", "stamp", "--height", "0"], "1..=4096"),
        (&["fetch", "--tag", "stamp", "--size", "0"], "[1, 100]"),
        (
            &["fetch", "--tag", "stamp", "--timeout", "0"],
            "(0, 3600] seconds",
        ),
        (
            &["fetch", "--tag", "stamp", "--timeout", "-3"],
            "(0, 3600] seconds",
        ),
        (
            &["fetch", "--tag", "stamp", "--count", "0"],
            "[1, 10000000]",
        ),
        (&["fetch", "--tag", "stamp", "--retries", "1000"], "0..=20"),
        (
            &["fetch", "--tag", "stamp", "--patience", "0"],
            "[1, 10000]",
        ),
    ];
    for (args, range) in cases {
        let out = run(dir.path(), args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(range), "{args:?}: {err}");
    }
    // Nothing was created by any of them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn fit(dir: &Path, extra: &[&str]) -> Output {
    let data = common::data();
    let mut args = vec!["fit", "--device", "cpu", "--data", data.to_str().unwrap()];
    args.extend(extra);
    run(dir, &args)
}

const SMALL: &[&str] = &[
    "--image-size",
    "48",
    "--augment",
    "none",
    "--batch-size",
    "12",
];

#[test]
fn a_failing_init_creates_no_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.h5"), b"\x89HDF\r\n\x1a\nnot really").unwrap();
    for init in ["missing.h5", "broken.h5"] {
        let mut args = vec!["--init", init, "--epochs", "1"];
        args.extend(SMALL);
        let out = fit(dir.path(), &args);
        let err = common::stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(init), "{err}");
        assert!(
            !dir.path().join("runs").exists(),
            "{init}: a run folder was created"
        );
    }
}

fn rows(run: &Path) -> Vec<String> {
    common::results_rows(run)
        .into_iter()
        .skip(1)
        .map(|row| row[0].clone())
        .collect()
}

#[test]
fn run_folders_survive_kills_full_disks_and_concurrent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("runs/r");
    // The Keras weights cannot be written (their folder is a file): the epoch's checkpoint and
    // CSV row are kept all the same.
    std::fs::write(dir.path().join("blocked"), b"a file").unwrap();
    let mut args = vec!["--run", "r", "--epochs", "1", "--weights-dir", "blocked"];
    args.extend(SMALL);
    let out = fit(dir.path(), &args);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("epoch 1 is checkpointed"), "{err}");
    assert_eq!(rows(&run_dir), ["1"]);

    // A lost CSV and a temporary left by a kill are repaired on resume; --weights-dir is honoured.
    std::fs::write(run_dir.join("results.csv"), b"garbage\n").unwrap();
    std::fs::write(run_dir.join(".last.ckpt.Xy12ab.tmp"), b"half a checkpoint").unwrap();
    let out = fit(
        dir.path(),
        &["--resume", "runs/r", "--epochs", "2", "--weights-dir", "w2"],
    );
    common::succeeded(&out);
    assert_eq!(rows(&run_dir), ["1", "2"]);
    assert!(!run_dir.join(".last.ckpt.Xy12ab.tmp").exists());
    assert!(
        std::fs::read_dir(dir.path().join("w2")).unwrap().count() >= 1,
        "no Keras weights in the --weights-dir given on resume"
    );

    // A second process on the same run folder is refused, naming the holder.
    let lock = trainer::fsutil::lock_dir(&run_dir, "trainer fit").unwrap();
    std::fs::create_dir_all(dir.path().join("runs/new")).unwrap();
    let lock_new = trainer::fsutil::lock_dir(&dir.path().join("runs/new"), "trainer fit").unwrap();
    for args in [
        vec!["--resume", "runs/r", "--epochs", "3"],
        vec!["--run", "new", "--epochs", "1", "--image-size", "48"],
    ] {
        let out = fit(dir.path(), &args);
        let err = common::stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!(
                "is in use by another trainer fit (pid {}",
                std::process::id()
            )),
            "{err}"
        );
    }
    drop((lock, lock_new));
    assert_eq!(rows(&run_dir), ["1", "2"]);
    assert!(!dir.path().join("runs/new/last.ckpt").exists());

    // The training recipe cannot change on resume; the number of epochs must grow.
    let out = fit(dir.path(), &["--resume", "runs/r", "--lr", "0.1"]);
    assert_eq!(out.status.code(), Some(2), "{}", common::stderr(&out));
    let out = fit(dir.path(), &["--resume", "runs/r", "--epochs", "2"]);
    assert!(
        common::stderr(&out).contains("already holds 2 epochs"),
        "{}",
        common::stderr(&out)
    );
}
