//! Nothing written or removed outside what the user named, no rendezvous reachable from the
//! network for a job on one machine, and no half-written temporary kept once its writer is gone:
//! links planted under every name the program creates are never followed, clean-up of the image
//! cache removes only what the cache wrote, a killed writer's temporary goes on the next start
//! while a live writer's stays, and a two-rank job's store listens on loopback alone.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use trainer::data::{dataset, disk_cache};

/// A file of the user's that a link planted by someone else points to.
fn victim(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("the user's own {name}\n")).unwrap();
    path
}

fn assert_untouched(victims: &[&Path]) {
    for v in victims {
        let name = v.file_name().unwrap().to_string_lossy();
        let text = std::fs::read_to_string(v).unwrap_or_else(|e| panic!("{}: {e}", v.display()));
        assert_eq!(
            text,
            format!("the user's own {name}\n"),
            "{} changed",
            v.display()
        );
    }
}

fn link(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn is_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Sets the modification time of `paths` (links themselves, not their targets) to `days` ago.
fn age(days: u32, paths: &[PathBuf]) {
    let ok = Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("{days} days ago"))
        .args(paths)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch failed");
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The names in `dir` that look like temporaries (`.<name>.<random>.tmp[.lock]`).
fn temporaries(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with('.') && (n.ends_with(".tmp") || n.ends_with(".tmp.lock")))
        .collect()
}

/// Run as a child by [`writer`] only: writes half of `HARDENING_WRITE` through the program's
/// atomic writer (by path into HDF5 when `HARDENING_HDF5` is set, which then holds the file
/// open and locked as while saving weights), says so, and waits with its temporary open until
/// its standard input closes or it is killed.
#[test]
#[ignore]
fn child_writer() {
    let Some(dest) = std::env::var_os("HARDENING_WRITE") else {
        return;
    };
    let dest = PathBuf::from(dest);
    let wait = || {
        println!("writing");
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    };
    if std::env::var_os("HARDENING_HDF5").is_some() {
        let _ = trainer::fsutil::write_atomic_path(&dest, |tmp| {
            let file = hdf5::File::create(tmp)?;
            file.new_dataset::<f32>()
                .shape(1 << 18)
                .create("half")?
                .write_raw(&vec![1.0f32; 1 << 18])?;
            file.flush()?;
            wait();
            Ok(())
        });
    } else {
        let _ = trainer::fsutil::write_atomic_with(&dest, |f| {
            f.write_all(&vec![7u8; 1 << 20])?;
            wait();
            Ok(())
        });
    }
}

/// A child process in the middle of writing `dest` (see [`child_writer`]), returned once its
/// temporary exists.
fn writer(dest: &Path, hdf5: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_writer", "--exact", "--ignored", "--nocapture"])
        .arg("--test-threads=1")
        .env("HARDENING_WRITE", dest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if hdf5 {
        cmd.env("HARDENING_HDF5", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    // libtest prints "test child_writer ... " before the test's own output.
    let started = out
        .lines()
        .any(|l| l.is_ok_and(|l| l.trim_end().ends_with("writing")));
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the child writer of {} ended before writing",
            dest.display()
        );
    }
    child
}

/// Kills a writer the way `kill -9` does: nothing of it runs after.
fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The cache key `fit --image-size 32` uses for `data`.
fn cache_key(data: &Path) -> String {
    let (_, samples) = dataset::open(data, None).unwrap();
    disk_cache::key(&samples, 32)
}

fn load(cache: &Path) -> anyhow::Result<disk_cache::Provenance> {
    let (taxonomy, samples) = dataset::open(&common::data(), None).unwrap();
    disk_cache::load(cache, &common::data(), samples, &taxonomy, 32).map(|(_, how)| how)
}

#[test]
fn the_image_cache_is_private_and_follows_no_planted_link() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("home/.cache/trainer/images");
    load(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cache folder is {mode:o}");

    let key = cache_key(&common::data());
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let victims: Vec<PathBuf> = ["lock.txt", "json.txt", "pixels.txt"]
        .iter()
        .map(|n| victim(tmp.path(), n))
        .collect();
    // A link as the entry's lock: refused with its name, its target untouched.
    link(&victims[0], &cache.join(format!("{key}.lock")));
    let err = format!("{:#}", load(&cache).err().expect("a linked lock was used"));
    assert!(
        err.contains(&format!("{key}.lock")) && err.contains("symbolic link"),
        "{err}"
    );
    // A dangling one creates nothing where it points.
    std::fs::remove_file(cache.join(format!("{key}.lock"))).unwrap();
    let nowhere = tmp.path().join("created-through-a-link");
    link(&nowhere, &cache.join(format!("{key}.lock")));
    assert!(load(&cache).is_err());
    assert!(!nowhere.exists());
    std::fs::remove_file(cache.join(format!("{key}.lock"))).unwrap();
    // Links as the description and the pixels: neither read nor written; the entry is made anew.
    link(&victims[1], &cache.join(format!("{key}.json")));
    link(&victims[2], &cache.join(format!("{key}.pixels")));
    let how = load(&cache).unwrap();
    assert!(!how.reused);
    for ext in ["json", "pixels", "lock"] {
        let meta = std::fs::symlink_metadata(cache.join(format!("{key}.{ext}"))).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{key}.{ext} is not a plain file"
        );
    }
    assert!(load(&cache).unwrap().reused);
    let refs: Vec<&Path> = victims.iter().map(PathBuf::as_path).collect();
    assert_untouched(&refs);
}

#[test]
fn cache_clean_up_removes_only_month_old_entries_the_cache_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    // An entry of the cache's own, to copy as an old one under another key.
    let made = tmp.path().join("made");
    load(&made).unwrap();
    let key = cache_key(&common::data());
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let hex = |c: char| c.to_string().repeat(64);
    let own = hex('e');
    for ext in ["json", "pixels", "lock"] {
        std::fs::copy(
            made.join(format!("{key}.{ext}")),
            cache.join(format!("{own}.{ext}")),
        )
        .unwrap();
    }
    // The user's files, some named as the cache names its own.
    let user_victim = victim(tmp.path(), "target.json");
    let foreign = [
        "notes.json".to_string(),
        "photo.pixels".into(),
        "a.lock".into(),
        format!("{}.json", hex('a')),
        format!("{}.pixels", hex('a')),
        format!("{}.lock", hex('a')),
        format!("{}.json", hex('b')),
        ".notes.Ab12Cd34Ef.tmp".into(),
        "settings.json".into(),
    ];
    for (i, name) in foreign.iter().enumerate() {
        let text = match i {
            3 => r#"{"preprocessing_version":1,"size":32,"samples":1,"kept":[],"skipped":[],"bytes":0,"sha256":""}"#.to_string(),
            6 => "not JSON at all".into(),
            _ => format!("the user's {name}"),
        };
        std::fs::write(cache.join(name), text).unwrap();
    }
    let linked = cache.join(format!("{}.json", hex('c')));
    link(&user_victim, &linked);
    // An abandoned temporary of the cache's own (a decode killed mid-write).
    let own_tmp = format!(".{}.pixels.Zz98Yy76Xx.tmp", hex('d'));
    std::fs::write(cache.join(&own_tmp), b"half").unwrap();
    let mut all: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.push(user_victim.clone());
    age(40, &all);

    // A new entry is written: the clean-up runs.
    assert!(!load(&cache).unwrap().reused);
    let left = names(&cache);
    for name in foreign.iter().chain([&format!("{}.json", hex('c'))]) {
        assert!(left.contains(name), "{name} was removed: {left:?}");
    }
    for ext in ["json", "pixels", "lock"] {
        assert!(
            !left.contains(&format!("{own}.{ext}")),
            "{own}.{ext} kept: {left:?}"
        );
    }
    assert!(!left.contains(&own_tmp), "{left:?}");
    assert!(is_link(&linked));
    assert_untouched(&[&user_victim]);
    for (i, name) in foreign.iter().enumerate() {
        if ![3, 6].contains(&i) {
            let text = std::fs::read_to_string(cache.join(name)).unwrap();
            assert_eq!(text, format!("the user's {name}"));
        }
    }
}

fn fit(dir: &Path, cache: &Path, more: &[&str]) -> Output {
    common::trainer()
        .current_dir(dir)
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
        .arg("--cache-dir")
        .arg(cache)
        .args(["--epochs", "1", "--run", "r", "--weights-dir", "w"])
        .args(more)
        .output()
        .unwrap()
}

#[test]
fn fit_follows_no_planted_link_and_clears_only_dead_writers_temporaries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let victims: Vec<PathBuf> = ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .map(|n| victim(dir, &format!("{n}.txt")))
        .collect();
    let cache = dir.join("cache");
    std::fs::create_dir(&cache).unwrap();
    let key_lock = cache.join(format!("{}.lock", cache_key(&common::data())));
    link(&victims[0], &key_lock);
    let out = fit(dir, &cache, &[]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("symbolic link"),
        "{}",
        common::stderr(&out)
    );
    std::fs::remove_file(&key_lock).unwrap();

    // The run folder's lock.
    let run = dir.join("runs/r");
    std::fs::create_dir_all(&run).unwrap();
    link(&victims[1], &run.join(".lock"));
    let out = fit(dir, &cache, &[]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("symbolic link"),
        "{}",
        common::stderr(&out)
    );
    std::fs::remove_file(run.join(".lock")).unwrap();

    // The run's own files and a link named like a temporary; the weights folder with the
    // temporaries of two killed writers and of two live ones (HDF5 and plain).
    for (v, name) in victims[2..]
        .iter()
        .zip(["results.csv", "settings.json", "val.txt"])
    {
        link(v, &run.join(name));
    }
    let weights = dir.join("w");
    std::fs::create_dir(&weights).unwrap();
    link(&victims[5], &weights.join(".x.hdf5.Ab12Cd34Ef.tmp"));
    kill(writer(&weights.join("killed.hdf5"), true));
    kill(writer(&weights.join("killed.json"), false));
    let killed = temporaries(&weights);
    assert_eq!(killed.len(), 4, "{killed:?}");
    let live_h5 = writer(&weights.join("live.hdf5"), true);
    let live = writer(&weights.join("live.json"), false);
    let live_tmps: Vec<String> = temporaries(&weights)
        .into_iter()
        .filter(|n| n.starts_with(".live."))
        .collect();
    assert_eq!(live_tmps.len(), 3, "{live_tmps:?}");

    let out = fit(dir, &cache, &[]);
    common::succeeded(&out);
    let left = temporaries(&weights);
    kill(live_h5);
    kill(live);
    let mut expected = live_tmps.clone();
    expected.push(".x.hdf5.Ab12Cd34Ef.tmp".into());
    expected.sort();
    assert_eq!(left, expected, "killed writers' temporaries: {killed:?}");
    assert!(is_link(&weights.join(".x.hdf5.Ab12Cd34Ef.tmp")));
    for name in ["results.csv", "settings.json", "val.txt"] {
        assert!(!is_link(&run.join(name)), "{name} is still a link");
    }
    let refs: Vec<&Path> = victims.iter().map(PathBuf::as_path).collect();
    assert_untouched(&refs);
}

#[test]
fn infer_clears_a_killed_writers_temporary_and_keeps_a_live_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in/book");
    std::fs::create_dir_all(&input).unwrap();
    let stamp = common::data().join("stamp");
    let first = std::fs::read_dir(&stamp)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&first, input.join(first.file_name().unwrap())).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    kill(writer(&out.join("old.json"), false));
    let killed = temporaries(&out);
    assert_eq!(killed.len(), 1);
    let live = writer(&out.join("other.json"), false);
    let live_tmp: Vec<String> = temporaries(&out)
        .into_iter()
        .filter(|n| n.starts_with(".other."))
        .collect();
    let result = common::trainer()
        .args(["infer", "--device", "cpu", "--weights"])
        .arg(common::oracle().join("ndl_b0_weights.h5"))
        .arg("--input")
        .arg(tmp.path().join("in"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let left = temporaries(&out);
    kill(live);
    assert!(result.status.success(), "{}", common::stderr(&result));
    assert_eq!(left, live_tmp, "killed writer's: {killed:?}");
}

/// The local addresses (hex, as /proc/net/tcp writes them) listening on `port`.
fn listening_on(port: u16) -> Vec<String> {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[3] == "0A" && f[1].ends_with(&port)).then(|| f[1].to_owned())
        })
        .collect()
}

/// This machine's first address that is not loopback, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?; // no packet is sent: it only picks a route
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_two_rank_jobs_rendezvous_listens_on_loopback_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut job = common::trainer()
        .current_dir(tmp.path())
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
        .args([
            "--epochs",
            "1",
            "--run",
            "r",
            "--weights-dir",
            "w",
            "--cache-dir",
            "none",
        ])
        .args(["--nproc-per-node", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(job.stderr.take().unwrap()).lines();
    let port: u16 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            let at = l.split("rendezvous at 127.0.0.1:").nth(1)?;
            at.trim_end_matches(')').parse().ok()
        })
        .expect("no rendezvous line");
    // Until the job ends: rank 0's store listens from its start to the job's end.
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let mut seen = Vec::new();
    while seen.is_empty() && job.try_wait().unwrap().is_none() {
        seen = listening_on(port);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let refused = outside_address().map(|ip| std::net::TcpStream::connect((ip, port)).is_err());
    let status = job.wait().unwrap();
    let text = reader.join().unwrap().join("\n");
    assert!(status.success(), "{text}");
    assert!(
        !seen.is_empty(),
        "the store's port {port} was never seen listening"
    );
    let loopback = format!("0100007F:{port:04X}");
    assert!(seen.iter().all(|a| *a == loopback), "listening on {seen:?}");
    assert_ne!(
        refused,
        Some(false),
        "the store answered on a non-loopback address"
    );
}
