//! How jobs end when the world around them goes: SIGTERM (what SLURM and Kubernetes send at a
//! time limit) stops `fit` and `infer` as Ctrl-C does; SIGHUP (a closed terminal) and a closed
//! or full stdout/stderr never cost a job its files; batch-norm over one-image batches and a
//! non-finite validation loss.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::{nn, Device};
use trainer::data::taxonomy::Taxonomy;
use trainer::model::checkpoint::{self, Checkpoint};
use trainer::model::efficientnet::{Tagger, TaggerConfig};

fn keras_model() -> PathBuf {
    common::oracle().join("ndl_b0_model.hdf5")
}

/// The write end of a pipe whose read end is already closed: every write fails with EPIPE, as
/// for `| head` once it has what it wants.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors, which are owned here from now on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
    Stdio::from(unsafe { OwnedFd::from_raw_fd(fds[1]) })
}

/// `/dev/full`: every write fails with ENOSPC.
fn full_device() -> Stdio {
    Stdio::from(std::fs::File::create("/dev/full").unwrap())
}

fn no_panic(out: &Output) {
    let text = common::stderr(out);
    assert!(!text.contains("panicked"), "{text}");
}

/// `count` folders of three sample images each (hard links), for a job of a few seconds.
fn book_shelf(dir: &Path, count: usize) -> PathBuf {
    let input = dir.join("input");
    let mut images: Vec<PathBuf> = std::fs::read_dir(common::data().join("stamp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    for i in 0..count {
        let folder = input.join(format!("book{i:03}"));
        std::fs::create_dir_all(&folder).unwrap();
        for (j, image) in images.iter().take(3).enumerate() {
            std::fs::hard_link(image, folder.join(format!("{j}.jpg"))).unwrap();
        }
    }
    input
}

fn infer_command(dir: &Path, input: &Path) -> Command {
    infer_with(dir, &keras_model(), input)
}

fn infer_with(dir: &Path, weights: &Path, input: &Path) -> Command {
    let mut cmd = common::trainer();
    cmd.current_dir(dir).args([
        "infer",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "out",
    ]);
    cmd
}

/// The JSON files in `out`, each checked to parse; no temporaries may be left.
fn whole_json_files(out: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "a temporary is left: {name}");
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{name} is not whole JSON: {e}"));
        n += 1;
    }
    n
}

/// Waits until `ready` holds (panics after two minutes), then sends `signal` (a `kill` flag).
fn signal_when(child: &Child, signal: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn json_count(out: &Path) -> usize {
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn sigterm_stops_infer_after_the_batch_and_sighup_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let input = book_shelf(dir.path(), 60);
    let out = dir.path().join("out");

    let child = infer_command(dir.path(), &input)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    signal_when(&child, "-TERM", || json_count(&out) > 0);
    let result = child.wait_with_output().unwrap();
    assert_eq!(
        result.status.code(),
        Some(143),
        "{}",
        common::stderr(&result)
    );
    assert!(
        common::stderr(&result).contains("run the same command again"),
        "{}",
        common::stderr(&result)
    );
    let written = whole_json_files(&out);
    assert!(
        (1..60).contains(&written),
        "{written} of 60 folders written"
    );

    // A hang-up (the terminal closed) does not stop the rest of the job.
    let child = infer_command(dir.path(), &input)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    signal_when(&child, "-HUP", || json_count(&out) > written);
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", common::stderr(&result));
    assert_eq!(whole_json_files(&out), 60);
}

#[test]
fn closed_or_full_output_never_costs_results() {
    let dir = tempfile::tempdir().unwrap();
    let input = book_shelf(dir.path(), 10);
    let out = dir.path().join("out");
    for (what, stdout, stderr_to) in [
        ("stderr to /dev/full", Stdio::null(), full_device()),
        ("stderr to a closed pipe", Stdio::null(), closed_pipe()),
        (
            "stdout and stderr to a closed pipe",
            closed_pipe(),
            closed_pipe(),
        ),
    ] {
        let _ = std::fs::remove_dir_all(&out);
        let result = infer_command(dir.path(), &input)
            .stdout(stdout)
            .stderr(stderr_to)
            .output()
            .unwrap();
        assert!(result.status.success(), "{what}: {:?}", result.status);
        assert_eq!(whole_json_files(&out), 10, "{what}");
    }
    // An output command ends quietly when its reader has gone (`trainer doctor | head -1`).
    let result = common::trainer()
        .arg("doctor")
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    no_panic(&result);
    assert!(result.status.success(), "{}", common::stderr(&result));
}

#[test]
fn fit_and_eval_report_finish_with_stderr_gone() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data();
    let result = common::trainer()
        .current_dir(dir.path())
        .args(["fit", "--device", "cpu", "--data", data.to_str().unwrap()])
        .args([
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "12",
            "--run",
            "r",
        ])
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert!(result.status.success(), "fit: {:?}", result.status);
    let best = dir.path().join("runs/r/best.ckpt");
    assert_eq!(
        Checkpoint::read(&dir.path().join("runs/r/last.ckpt"))
            .unwrap()
            .meta
            .epoch,
        2
    );
    let result = common::trainer()
        .current_dir(dir.path())
        .args([
            "eval",
            "--device",
            "cpu",
            "--weights",
            best.to_str().unwrap(),
        ])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--report",
            "--output",
            "eval",
        ])
        .stdout(closed_pipe())
        .stderr(full_device())
        .output()
        .unwrap();
    assert!(result.status.success(), "eval: {:?}", result.status);
    for name in ["eval.json", "eval.csv", "report.html"] {
        assert!(dir.path().join("eval").join(name).is_file(), "{name}");
    }
}

fn fit_command(dir: &Path, extra: &[&str]) -> Command {
    let data = common::data();
    let mut cmd = common::trainer();
    cmd.current_dir(dir)
        .args(["fit", "--device", "cpu", "--data", data.to_str().unwrap()])
        .args(extra);
    cmd
}

#[test]
fn sigterm_stops_fit_like_ctrl_c_with_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--image-size",
        "32",
        "--batch-size",
        "6",
        "--epochs",
        "200",
        "--run",
        "t",
    ];
    let child = fit_command(dir.path(), &args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let last = dir.path().join("runs/t/last.ckpt");
    signal_when(&child, "-TERM", || last.exists());
    let result = child.wait_with_output().unwrap();
    assert_eq!(
        result.status.code(),
        Some(143),
        "{}",
        common::stderr(&result)
    );
    assert!(
        common::stderr(&result).contains("continue with: trainer fit --resume runs/t"),
        "{}",
        common::stderr(&result)
    );
    let epoch = Checkpoint::read(&last).unwrap().meta.epoch;
    assert!((1..200).contains(&epoch));
    let next = (epoch + 1).to_string();
    let result = fit_command(dir.path(), &[])
        .args(["--resume", "runs/t", "--epochs", &next])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", common::stderr(&result));
    assert_eq!(Checkpoint::read(&last).unwrap().meta.epoch, epoch + 1);
}

fn all_finite(path: &Path) -> bool {
    let vs = nn::VarStore::new(Device::Cpu);
    let ckpt = Checkpoint::read(path).unwrap();
    let n = ckpt.meta.taxonomy.labels.len() as i64;
    let _net = Tagger::new(
        &vs.root(),
        TaggerConfig {
            num_classes: n,
            ..Default::default()
        },
    );
    ckpt.load_model(&vs, path).unwrap();
    vs.variables()
        .values()
        .all(|t| t.isfinite().all().int64_value(&[]) == 1)
}

#[test]
fn one_image_batches_keep_finite_statistics_at_the_smallest_size() {
    let dir = tempfile::tempdir().unwrap();
    // At 32 px the last feature map is 1x1: one image gives one value per channel.
    let result = fit_command(dir.path(), &["--image-size", "32", "--batch-size", "1"])
        .args(["--augment", "none", "--epochs", "1", "--run", "one"])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", common::stderr(&result));
    let best = dir.path().join("runs/one/best.ckpt");
    assert!(all_finite(&best));
    let result = infer_with(dir.path(), &best, &common::data().join("stamp"))
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", common::stderr(&result));
}

/// A checkpoint whose batch-norm variances are negative: training (batch statistics) runs, but
/// every validation output is NaN.
fn negative_variance_checkpoint(path: &Path) {
    let taxonomy = Taxonomy::ndl();
    let vs = nn::VarStore::new(Device::Cpu);
    let n = taxonomy.labels.len() as i64;
    let _net = Tagger::new(
        &vs.root(),
        TaggerConfig {
            num_classes: n,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("top_bn.running_var") {
                let _ = t.fill_(-1000.0);
            }
        }
    });
    let meta = common::checkpoint_meta(taxonomy, 32);
    checkpoint::save(path, &meta, &vs, &[]).unwrap();
}

#[test]
fn a_non_finite_validation_loss_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("bad.ckpt");
    negative_variance_checkpoint(&init);
    let result = fit_command(dir.path(), &["--image-size", "32", "--batch-size", "12"])
        .args([
            "--epochs",
            "3",
            "--run",
            "nan",
            "--init",
            init.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = common::stderr(&result);
    assert!(!result.status.success(), "{text}");
    assert!(
        text.contains("epoch 1: the validation loss is NaN; stopping"),
        "{text}"
    );
    assert!(!dir.path().join("runs/nan/best.ckpt").exists(), "{text}");
    assert!(!dir.path().join("runs/nan/last.ckpt").exists(), "{text}");
}
