//! Progress bars and Ctrl-C.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static QUIET: AtomicBool = AtomicBool::new(false);

/// No progress bars and no informational lines from now on (ranks other than 0 of a job);
/// errors and warnings still print.
pub fn set_quiet() {
    QUIET.store(true, Ordering::SeqCst);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::SeqCst)
}

/// Makes Ctrl-C set a flag that long loops check ([`interrupted`]) so they can stop cleanly and
/// leave only whole files. A second Ctrl-C exits at once.
pub fn install_ctrlc_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting now");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt received: finishing the current step (Ctrl-C again to exit at once)"
        );
    });
}

/// True once Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
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
