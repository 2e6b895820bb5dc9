//! Several ranks on CPU (Gloo): `--nproc-per-node 2` and a hand-made torchrun environment train
//! what one process accumulating two micro-batches trains, only rank 0 writes, and a killed rank
//! stops the other with a message.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trainer::model::checkpoint::Checkpoint;

/// `trainer fit` on the sample at 32 px, global batch 16, with the original augmentations.
fn fit_cmd(dir: &Path, run: &str, epochs: &str, more: &[&str]) -> Command {
    let mut cmd = common::trainer();
    cmd.current_dir(dir)
        .args([
            "fit",
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--batch-size",
            "16",
        ])
        .arg("--data")
        .arg(common::data())
        .args(["--epochs", epochs, "--run", run])
        .args(["--weights-dir", &format!("w-{run}")])
        .args(more);
    cmd
}

/// Rank `rank` of 2, started by hand with torchrun's five variables.
fn rank(dir: &Path, run: &str, epochs: &str, rank: usize, port: u16, more: &[&str]) -> Child {
    fit_cmd(dir, run, epochs, more)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn train_losses(run: &Path) -> Vec<f64> {
    common::results_rows(run)
        .iter()
        .skip(1)
        .map(|row| row[1].parse().unwrap())
        .collect()
}

/// Largest difference between the trainable weights (batch-norm statistics are per rank, as in
/// DDP, and left out).
fn weight_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (Checkpoint::read(a).unwrap(), Checkpoint::read(b).unwrap());
    a.tensors
        .iter()
        .filter(|(k, _)| k.starts_with("model.") && !k.contains("running_"))
        .map(|(k, t)| {
            let d = (t - &b.tensors[k]).abs().max().double_value(&[]);
            if d > 1e-6 {
                eprintln!("{k}: {d}");
            }
            d
        })
        .fold(0.0, f64::max)
}

/// The names of a folder's files, a TensorBoard event file's (which holds the writer's time and
/// process id) as its prefix.
fn files(dir: &Path) -> Vec<String> {
    let prefix = "events.out.tfevents.";
    common::file_names(dir)
        .into_iter()
        .map(|n| match n.starts_with(prefix) {
            true => prefix.to_string(),
            false => n,
        })
        .collect()
}

#[test]
fn two_ranks_train_what_one_process_accumulating_two_micro_batches_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // One thread, as each of the two ranks gets on this machine's 2 cores: the same kernels sum
    // in the same order (Adam's first steps magnify rounding in near-zero gradients).
    common::ok(
        fit_cmd(d, "acc", "2", &["--accumulate", "2"])
            .env("OMP_NUM_THREADS", "1")
            .output()
            .unwrap(),
    );
    let cache = d.join("cache");
    let stderr = common::ok(
        fit_cmd(d, "two", "2", &["--nproc-per-node", "2"])
            .arg("--cache-dir")
            .arg(&cache)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .unwrap(),
    );
    assert!(stderr.contains("starting 2 ranks"), "{stderr}");
    // The ranks shared one decoded-image file.
    let pixels: Vec<String> = files(&cache)
        .into_iter()
        .filter(|f| f.ends_with(".pixels"))
        .collect();
    assert_eq!(pixels.len(), 1, "{pixels:?}");
    // Only rank 0 speaks: one line per epoch.
    assert_eq!(stderr.matches("epoch 2/2").count(), 1, "{stderr}");

    let runs = d.join("runs");
    let (one, two) = (
        train_losses(&runs.join("acc")),
        train_losses(&runs.join("two")),
    );
    assert_eq!(one.len(), 2);
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{one:?} vs {two:?}");
    }
    let diff = weight_diff(&runs.join("acc/last.ckpt"), &runs.join("two/last.ckpt"));
    assert!(diff <= 1e-5, "weights differ by {diff}");
    // One rank wrote: the same files as one process.
    assert_eq!(files(&runs.join("acc")), files(&runs.join("two")));
    assert_eq!(files(&d.join("w-acc")).len(), files(&d.join("w-two")).len());

    // The same job launched by hand, as torchrun or srun would.
    let port = trainer::dist::free_port().unwrap();
    let children = [
        rank(d, "env", "2", 0, port, &[]),
        rank(d, "env", "2", 1, port, &[]),
    ];
    for child in children {
        let out = child.wait_with_output().unwrap();
        common::ok(out);
    }
    assert_eq!(train_losses(&runs.join("env")), two);
    let diff = weight_diff(&runs.join("env/last.ckpt"), &runs.join("two/last.ckpt"));
    assert_eq!(diff, 0.0);

    // Resume with another number of ranks: one process goes on from the two ranks' run.
    let out = common::trainer()
        .current_dir(d)
        .args([
            "fit", "--device", "cpu", "--resume", "runs/two", "--epochs", "3",
        ])
        .output()
        .unwrap();
    let stderr = common::ok(out);
    assert!(
        stderr.contains("resuming runs/two after epoch 2"),
        "{stderr}"
    );
    assert_eq!(train_losses(&runs.join("two")).len(), 3);
}

#[test]
fn a_killed_rank_stops_the_other_with_a_message_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = trainer::dist::free_port().unwrap();
    let more = ["--dist-timeout", "60"];
    let mut r0 = rank(d, "k", "500", 0, port, &more);
    let mut r1 = rank(d, "k", "500", 1, port, &more);
    // Wait until the job trains (rank 0 has written an epoch), then kill rank 1.
    let csv = d.join("runs/k/results.csv");
    let start = Instant::now();
    while std::fs::read_to_string(&csv).map_or(true, |t| t.lines().count() < 2) {
        assert!(start.elapsed() < Duration::from_secs(120), "no epoch done");
        std::thread::sleep(Duration::from_millis(100));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "rank 0 still runs 60 s after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    use std::io::Read;
    r0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("rank 0:") && stderr.contains("did another rank stop?"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // What rank 0 had written is whole.
    Checkpoint::read(&d.join("runs/k/last.ckpt")).unwrap();
}

#[test]
fn ctrl_c_stops_every_rank_with_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let job = fit_cmd(d, "c", "500", &["--nproc-per-node", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let csv = d.join("runs/c/results.csv");
    let start = Instant::now();
    while std::fs::read_to_string(&csv).map_or(true, |t| t.lines().count() < 2) {
        assert!(start.elapsed() < Duration::from_secs(120), "no epoch done");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our child's pid.
    unsafe {
        libc::kill(job.id() as libc::pid_t, libc::SIGINT);
    }
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("continue with: trainer fit --resume runs/c"),
        "{stderr}"
    );
    let last = Checkpoint::read(&d.join("runs/c/last.ckpt")).unwrap();
    assert!(last.meta.epoch >= 1 && last.meta.epoch < 500);
}

#[test]
fn a_two_rank_run_resumed_on_two_ranks_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two = ["--nproc-per-node", "2"];
    common::ok(fit_cmd(d, "whole", "3", &two).output().unwrap());
    common::ok(fit_cmd(d, "part", "2", &two).output().unwrap());
    let out = common::trainer()
        .current_dir(d)
        .args([
            "fit",
            "--device",
            "cpu",
            "--resume",
            "runs/part",
            "--epochs",
            "3",
        ])
        .args(two)
        .output()
        .unwrap();
    common::ok(out);
    let runs = d.join("runs");
    let (a, b) = (
        Checkpoint::read(&runs.join("whole/last.ckpt")).unwrap(),
        Checkpoint::read(&runs.join("part/last.ckpt")).unwrap(),
    );
    assert_eq!((a.meta.epoch, b.meta.epoch), (3, 3));
    for (name, t) in &a.tensors {
        assert!(t.equal(&b.tensors[name]), "{name} differs");
    }
    assert_eq!(
        common::untimed_rows(&runs.join("whole")),
        common::untimed_rows(&runs.join("part"))
    );
}
