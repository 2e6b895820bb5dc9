//! `trainer fit --nproc-per-node N`: starts N ranks of this program on this machine with
//! torchrun's environment variables, and watches them: when one fails, the others are stopped
//! and the failing rank is named; Ctrl-C or SIGTERM reaches every rank, which stop together.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::progress;

/// The command line without `--nproc-per-node N` (or `--nproc-per-node=N`).
pub fn without_nproc(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let text = a.to_string_lossy();
        if text == "--nproc-per-node" {
            skip = true;
        } else if !text.starts_with("--nproc-per-node=") {
            out.push(a.clone());
        }
    }
    out
}

/// Sends `signal` to a rank still running.
fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

fn code(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    }
}

/// Runs `n` ranks of `trainer <args>` (the arguments after the program name, without
/// `--nproc-per-node`) and returns the job's exit code.
pub fn run_local(n: usize, args: Vec<OsString>) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let port = crate::dist::free_port()?;
    crate::errln!("starting {n} ranks on this machine (rendezvous at 127.0.0.1:{port})");
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        // Each rank in its own process group, so Ctrl-C reaches this process alone, which passes
        // it on once; and a rank dies with this process (SIGTERM when it goes).
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(Some(child));
    }
    watch(children)
}

/// Waits for every rank. The first one to fail is named, and the others get SIGTERM (then
/// SIGKILL after 10 s).
fn watch(mut children: Vec<Option<Child>>) -> Result<ExitCode> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut interrupt_passed = false;
    while statuses.iter().any(Option::is_none) {
        if let Some(sig) = progress::stop_signal().filter(|_| !interrupt_passed) {
            interrupt_passed = true;
            children.iter().flatten().for_each(|c| signal(c, sig));
        }
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                statuses[rank] = Some(status);
                *slot = None;
                if !status.success() && failed.is_none() && !progress::interrupted() {
                    failed = Some((rank, status));
                }
            }
        }
        if failed.is_some() && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
            children
                .iter()
                .flatten()
                .for_each(|c| signal(c, libc::SIGTERM));
        }
        if stopping_since.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            for child in children.iter_mut().flatten() {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some((rank, status)) = failed {
        crate::errln!(
            "error: rank {rank} failed ({}); the other ranks were stopped",
            code(&status)
        );
        return Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(1, 255) as u8
        ));
    }
    // Ranks stopped by Ctrl-C or SIGTERM (passed on from here, or sent to them directly).
    let stopped = statuses
        .iter()
        .flatten()
        .find_map(|s| s.code().filter(|c| matches!(c, 130 | 143)));
    Ok(stopped.map_or(ExitCode::SUCCESS, |c| ExitCode::from(c as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_per_node_is_left_out_in_both_spellings() {
        let args: Vec<OsString> = [
            "fit",
            "--nproc-per-node",
            "2",
            "--epochs",
            "3",
            "--nproc-per-node=4",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out: Vec<String> = without_nproc(&args)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(out, ["fit", "--epochs", "3"]);
    }
}
