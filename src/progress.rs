//! Progress bars, stop signals (Ctrl-C, SIGTERM) and lines on closed terminals.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

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

/// `eprintln!` for informational lines, left out when output is quiet (not a terminal's
/// progress, or a rank other than 0 of a job).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        if !$crate::progress::quiet() {
            $crate::errln!($($arg)*);
        }
    };
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

/// A bar over `len` items; drawn on stderr only when it is a terminal. Its rate and time left
/// are in human units (`12.3 images/s`, `2.5 s/image`, `eta 1m 20s`): see [`format_rate`] and
/// [`format_eta`].
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), draw_target());
    let template = format!(
        "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{rate}}, eta {{time_left}} {{msg}}"
    );
    let rate_unit = unit.to_string();
    pb.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .with_key(
                "rate",
                move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&format_rate(s.per_sec(), &rate_unit));
                },
            )
            .with_key(
                "time_left",
                |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let known = s.pos() > 0 && s.per_sec() > 0.0;
                    let _ = w.write_str(&format_eta(known.then(|| s.eta())));
                },
            )
            .progress_chars("=> "),
    );
    pb
}

/// A rate in human units: `12.3 images/s` from 1 to 100 a second, `250 images/s` above, `2.5
/// s/image` below 1 a second, `-` for `unit` when nothing was counted yet (`unit` is plural; its
/// singular drops a final `s`).
pub fn format_rate(per_sec: f64, unit: &str) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return format!("- {unit}/s");
    }
    if per_sec < 1.0 {
        let one = unit.strip_suffix('s').unwrap_or(unit);
        let each = 1.0 / per_sec;
        return if each < 9.95 {
            format!("{each:.1} s/{one}")
        } else {
            format!("{} s/{one}", each.round())
        };
    }
    if per_sec < 99.95 {
        format!("{per_sec:.1} {unit}/s")
    } else {
        format!("{} {unit}/s", per_sec.round())
    }
}

/// Time left in human units: `45s`, `1m 20s`, `2h 05m`; `-` while unknown.
pub fn format_eta(left: Option<Duration>) -> String {
    let Some(left) = left else {
        return "-".to_string();
    };
    let secs = left.as_secs_f64().round() as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() && !quiet() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_below_one_a_second_are_seconds_per_item() {
        assert_eq!(format_rate(0.4, "images"), "2.5 s/image");
        assert_eq!(format_rate(0.9, "images"), "1.1 s/image");
        assert_eq!(format_rate(0.05, "images"), "20 s/image");
        assert_eq!(format_rate(0.0, "images"), "- images/s");
        assert_eq!(format_rate(f64::NAN, "images"), "- images/s");
    }

    #[test]
    fn rates_from_one_to_a_thousand_a_second() {
        assert_eq!(format_rate(1.0, "images"), "1.0 images/s");
        assert_eq!(format_rate(10.5594, "images"), "10.6 images/s");
        assert_eq!(format_rate(12.34, "images"), "12.3 images/s");
        assert_eq!(format_rate(99.97, "images"), "100 images/s");
        assert_eq!(format_rate(412.6, "images"), "413 images/s");
        assert_eq!(format_rate(1000.0, "images"), "1000 images/s");
    }

    #[test]
    fn etas_in_seconds_minutes_and_hours() {
        let eta = |s: f64| format_eta(Some(Duration::from_secs_f64(s)));
        assert_eq!(format_eta(None), "-");
        assert_eq!(eta(0.0), "0s");
        assert_eq!(eta(7.4), "7s");
        assert_eq!(eta(59.4), "59s");
        assert_eq!(eta(59.6), "1m 00s");
        assert_eq!(eta(80.0), "1m 20s");
        assert_eq!(eta(3599.0), "59m 59s");
        assert_eq!(eta(3600.0), "1h 00m");
        assert_eq!(eta(2.0 * 3600.0 + 5.0 * 60.0 + 10.0), "2h 05m");
        assert_eq!(eta(30.0 * 3600.0), "30h 00m");
    }
}
