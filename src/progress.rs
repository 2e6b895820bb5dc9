//! Progress bars, stop signals (Ctrl-C, SIGTERM) and lines on closed terminals.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Writes to stderr, ignoring a closed or full stderr: unlike `eprintln!`, which panics there, a
/// lost terminal or `2>/dev/full` never stops a job (its files are what matters).
pub fn write_err(args: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// Writes to stdout, ignoring a closed pipe (`trainer doctor | head -1` ends quietly).
pub fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.flush());
}

/// `eprintln!` that never panics (see [`write_err`]).
#[macro_export]
macro_rules! errln {
    () => { $crate::progress::write_err(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::progress::write_err(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `println!` that never panics (see [`write_out`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::progress::write_out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::progress::write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that never panics (see [`write_out`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::progress::write_out(format_args!($($arg)*)) };
}

/// The first stop signal received (SIGINT or SIGTERM), 0 before any.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// When it came (CLOCK_MONOTONIC, milliseconds), to tell a second request from a repeat.
static SIGNAL_AT_MS: AtomicI64 = AtomicI64::new(0);
static QUIET: AtomicBool = AtomicBool::new(false);

/// A second signal this soon after the first is the same request arriving twice (a launcher
/// passing on what the scheduler also sent to every process), not a person insisting.
const REPEAT_MS: i64 = 1000;

/// No progress bars and no informational lines from now on (ranks other than 0 of a job);
/// errors and warnings still print.
pub fn set_quiet() {
    QUIET.store(true, Ordering::SeqCst);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::SeqCst)
}

fn monotonic_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Writes `bytes` to stderr with write(2) alone, ignoring failures (safe in a signal handler).
fn raw_stderr(bytes: &[u8]) {
    // SAFETY: write(2) on fd 2 with a valid buffer; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let now = monotonic_ms();
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        if now - SIGNAL_AT_MS.load(Ordering::SeqCst) < REPEAT_MS {
            return;
        }
        raw_stderr(b"\nstopped again: exiting now\n");
        // SAFETY: _exit(2) is async-signal-safe; nothing is left half-written, every file is
        // written to a temporary name first.
        unsafe { libc::_exit(128 + sig) };
    }
    SIGNAL_AT_MS.store(now, Ordering::SeqCst);
    let message: &[u8] = match sig {
        libc::SIGTERM => b"\ntermination requested (SIGTERM): finishing the current step (send it again after a second to exit at once)\n",
        _ => b"\ninterrupt received: finishing the current step (Ctrl-C again to exit at once)\n",
    };
    raw_stderr(message);
}

/// Makes Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and `kill` send before killing a
/// job at its time limit or on preemption) set a flag that long loops check ([`interrupted`])
/// so they stop cleanly after the current step and leave only whole files; a second signal,
/// a second or more after the first, exits at once. SIGHUP is ignored: a closed terminal never
/// costs a job its results.
pub fn install_signal_handlers() {
    // SAFETY: installing handlers that only touch atomics and call async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// True once Ctrl-C or SIGTERM was received.
pub fn interrupted() -> bool {
    SIGNAL.load(Ordering::SeqCst) != 0
}

/// The signal that stopped the job (SIGINT or SIGTERM), if any.
pub fn stop_signal() -> Option<libc::c_int> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The exit status of a job stopped by a signal, as a shell reports it: 130 after Ctrl-C, 143
/// after SIGTERM.
pub fn interrupted_exit_code() -> std::process::ExitCode {
    std::process::ExitCode::from((128 + stop_signal().unwrap_or(libc::SIGINT)) as u8)
}

/// Sleeps for `d`, waking early when Ctrl-C is pressed.
pub fn sleep(d: std::time::Duration) {
    let end = std::time::Instant::now() + d;
    while !interrupted() {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}

/// A bar over `len` items; drawn on stderr only when it is a terminal.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), draw_target());
    let template =
        format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}} {{msg}}");
    pb.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() && !quiet() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}
