//! Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one, and
//! opening lock files without ever following a link planted in their place.
//!
//! A temporary is `.<name>.<random>.tmp` beside its destination, created exclusively (never
//! through a symbolic link) and private (0600). Its writer holds an exclusive `flock` on it for
//! as long as it writes; a writer that hands the path to a library opening the file itself
//! (HDF5, which takes its own `flock` on it) holds the lock on a companion
//! `.<name>.<random>.tmp.lock` instead, made before the temporary and removed after it. A
//! starting process removes the temporaries whose locks it can take: their writer is gone (the
//! kernel releases a dead process's locks), whatever their age, while a live writer's (another
//! job sharing the folder) stays. Where the folder is shared between machines, `flock` is shared
//! too on NFS (Linux emulates it with the server's byte-range locks).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::Rng;

/// The suffix of a temporary, and of a temporary's lock companion.
const TMP: &str = ".tmp";
const TMP_LOCK: &str = ".tmp.lock";

/// The user this process runs as (who owns what it writes).
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether an opened file is a plain file of this user with no other name (not a link to
/// someone's file, not a device or a pipe).
fn is_own_file(meta: &std::fs::Metadata, single_name: bool) -> bool {
    meta.file_type().is_file() && meta.uid() == euid() && (!single_name || meta.nlink() == 1)
}

/// The text of `path`, at most `max` bytes; `Ok(None)` when the file is larger (the caller names
/// its limit). No more than `max + 1` bytes are ever read.
pub fn read_text_bounded(path: &Path, max: u64) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)?.take(max + 1).read_to_string(&mut text)?;
    Ok((text.len() as u64 <= max).then_some(text))
}

/// Whether `path` itself (not what a link there points to) is a plain file of this user.
pub fn is_own_path(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| is_own_file(&m, false))
}

/// Opens `path` for reading without following a symbolic link, and only if it is a plain file of
/// this user; what a process must read of a folder others could write in.
pub fn open_own_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !is_own_file(&file.metadata()?, false) {
        return Err(std::io::Error::other(
            "not a plain file of this user (a link, a device or someone else's file)",
        ));
    }
    Ok(file)
}

/// Opens (creating, private, if it is missing) the lock file `path`: never through a symbolic
/// link, never truncating, and only a plain file of this user with no other name, so a link
/// planted in its place makes nothing write or lock someone else's file.
pub fn open_lock_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!(
                "the lock file {} is a symbolic link; remove it (this program never follows one)",
                path.display()
            ),
            _ => anyhow::Error::new(e)
                .context(format!("cannot open the lock file {}", path.display())),
        })?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read the lock file {}", path.display()))?;
    if !is_own_file(&meta, true) {
        anyhow::bail!(
            "{} is not a lock file of this program (not a plain file of this user with one name); remove it",
            path.display()
        );
    }
    Ok(file)
}

/// A fresh random part for a temporary's name.
fn random_part() -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(10)
        .map(char::from)
        .collect()
}

/// Creates `path` exclusively (failing if anything, a symbolic link included, has that name),
/// private to the user.
fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Takes `file`'s lock for its writer. On a filesystem without locks the temporary stays
/// unlocked, and a clean-up, unable to test it, leaves it alone.
fn lock_for_writer(file: &File) -> std::io::Result<()> {
    match file.lock() {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK | libc::ENOSYS | libc::EOPNOTSUPP)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// A temporary file being written, removed unless it was moved into place; `lock` is the
/// companion a writer by path holds instead of a lock on the temporary itself.
struct Temporary {
    path: PathBuf,
    file: File,
    lock: Option<(PathBuf, File)>,
    done: bool,
}

impl Temporary {
    /// A new temporary beside `dest`, locked by this process (on itself, or on its companion
    /// when `by_path`, whose writer opens the file itself and may lock it).
    fn new(dest: &Path, by_path: bool) -> Result<Self> {
        let dir = parent(dest);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let cannot = || format!("cannot create a temporary file in {}", dir.display());
        for _ in 0..16 {
            let stem = format!(".{name}.{}", random_part());
            let path = dir.join(format!("{stem}{TMP}"));
            let lock = match by_path {
                true => {
                    let lock_path = dir.join(format!("{stem}{TMP_LOCK}"));
                    match create_new(&lock_path) {
                        Ok(f) => Some((lock_path, f)),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e).with_context(cannot),
                    }
                }
                false => None,
            };
            // A clean-up that took the lock in the instant between creating and locking may
            // have removed the file: then another name.
            if let Some((p, f)) = &lock {
                lock_for_writer(f).with_context(cannot)?;
                if !same_file(p, f) {
                    continue;
                }
            }
            match create_new(&path) {
                Ok(file) => {
                    if lock.is_none() {
                        lock_for_writer(&file).with_context(cannot)?;
                        if !same_file(&path, &file) {
                            continue;
                        }
                    }
                    return Ok(Temporary {
                        path,
                        file,
                        lock,
                        done: false,
                    });
                }
                Err(e) => {
                    if let Some((p, _)) = &lock {
                        let _ = std::fs::remove_file(p);
                    }
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e).with_context(cannot);
                    }
                }
            }
        }
        anyhow::bail!("{}: no free temporary name", cannot())
    }

    /// Gives the finished file the usual permissions and moves it over `dest`.
    fn persist(mut self, dest: &Path) -> Result<()> {
        // Temporaries are private (0600); the finished file gets the usual permissions.
        self.file
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the permissions of {}", dest.display()))?;
        std::fs::rename(&self.path, dest).with_context(|| {
            format!(
                "cannot move the finished file into place at {}",
                dest.display()
            )
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
        // The companion goes last: while it exists, the temporary is known to be alive.
        if let Some((p, _)) = &self.lock {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed and synced,
/// then renamed over the destination.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`] for writers that need a file handle (PNG encoders...). `write` gets
/// the temporary file; it is renamed into place only if `write` succeeds.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let mut tmp = Temporary::new(path, false)?;
    write(&mut tmp.file).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.file.sync_all().with_context(|| {
        format!(
            "cannot write {} (sync failed; is the disk full?)",
            path.display()
        )
    })?;
    tmp.persist(path)
}

/// Like [`write_atomic`] for writers that open the file themselves by path (HDF5): `write` gets
/// the path of an empty temporary file in the destination's folder, which is renamed into place
/// only if `write` succeeds, and removed otherwise. The lock that marks it alive is on its
/// companion, so the library may lock the file itself.
pub fn write_atomic_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = Temporary::new(path, true)?;
    write(&tmp.path).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
}

/// What a file name is to the clean-up: a temporary or a temporary's lock companion of the
/// destination `name` (`.<name>.<random>.tmp`, `.<name>.<random>.tmp.lock`).
#[derive(Debug, PartialEq)]
enum TempName<'a> {
    Data { dest: &'a str },
    Lock { dest: &'a str },
}

fn temp_name(file_name: &str) -> Option<TempName<'_>> {
    let inner = file_name.strip_prefix('.')?;
    let (inner, lock) = match inner.strip_suffix(TMP_LOCK) {
        Some(i) => (i, true),
        None => (inner.strip_suffix(TMP)?, false),
    };
    let (dest, random) = inner.rsplit_once('.')?;
    let random_ok = random.len() >= 6 && random.bytes().all(|b| b.is_ascii_alphanumeric());
    if dest.is_empty() || !random_ok {
        return None;
    }
    Some(match lock {
        true => TempName::Lock { dest },
        false => TempName::Data { dest },
    })
}

/// `path` opened for the clean-up's test, if it is a plain file of this user older than
/// `min_age`: read and write (NFS emulates `flock` with write locks, which need write access),
/// never through a link.
fn open_for_probe(path: &Path, min_age: std::time::Duration) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let old = meta
        .modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= min_age);
    (is_own_file(&meta, false) && old).then_some(file)
}

/// Whether the name `path` still stands for the opened `file` (so what is removed is what was
/// tested).
fn same_file(path: &Path, file: &File) -> bool {
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes `file`'s lock if nobody holds it: its writer is gone. (Where the filesystem has no
/// locks, nothing can be told, and nothing is removed.)
fn abandoned(file: &File) -> bool {
    file.try_lock().is_ok()
}

/// Removes the temporary `path` (or lone companion) if its writer is gone: the companion's lock
/// (tested first, so a live writer's library never finds its file's lock taken) and the
/// temporary's own are both free.
fn remove_if_abandoned(path: &Path, kind: &TempName, min_age: std::time::Duration) -> bool {
    let with_lock = |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push(".lock");
        PathBuf::from(s)
    };
    let companion = match kind {
        TempName::Data { .. } => with_lock(path),
        TempName::Lock { .. } => path.to_path_buf(),
    };
    let data = match kind {
        TempName::Data { .. } => Some(path.to_path_buf()),
        TempName::Lock { .. } => {
            let data = path.with_extension(""); // `.x.random.tmp.lock` -> `.x.random.tmp`
            if std::fs::symlink_metadata(&data).is_ok() {
                return false; // handled with its temporary
            }
            None
        }
    };
    let lock = match open_for_probe(&companion, min_age) {
        Some(f) if !abandoned(&f) => return false,
        Some(f) => Some(f),
        None if data.is_none() => return false,
        None => None,
    };
    if let Some(data) = &data {
        let Some(f) = open_for_probe(data, min_age) else {
            return false;
        };
        if !abandoned(&f) || !same_file(data, &f) || std::fs::remove_file(data).is_err() {
            return false;
        }
    }
    if let Some(f) = &lock {
        if same_file(&companion, f) {
            let _ = std::fs::remove_file(&companion);
        }
    }
    true
}

/// Removes from `dir` the temporaries [`write_atomic`] and its kin leave behind when a process
/// is killed mid-write: those whose writer is gone (nobody holds their lock), whatever their
/// age, if they are older than `min_age`; a live writer's are left alone. Only plain files of
/// this user named like a temporary are touched. Returns how many were removed.
pub fn remove_stale_temporaries(dir: &Path, min_age: std::time::Duration) -> usize {
    remove_stale_temporaries_of(dir, min_age, |_| true)
}

/// Like [`remove_stale_temporaries`], for the temporaries of the destinations `ours` accepts
/// (by name) only: a folder that may hold the user's own files.
pub fn remove_stale_temporaries_of(
    dir: &Path,
    min_age: std::time::Duration,
    ours: impl Fn(&str) -> bool,
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(kind) = temp_name(name) else {
            continue;
        };
        let (TempName::Data { dest } | TempName::Lock { dest }) = kind;
        if ours(dest) && remove_if_abandoned(&entry.path(), &kind, min_age) {
            removed += 1;
        }
    }
    removed
}

/// An exclusive lock on a folder, held while this value lives (an advisory `flock` on
/// `<dir>/.lock`, released by the kernel when the process ends, so a crashed holder never leaves
/// a stale lock). The file names the holder for the message another process gets.
pub struct DirLock {
    _file: File,
}

/// Takes the lock of `dir` (which must exist), or says who holds it.
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock> {
    let path = dir.join(".lock");
    let mut file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = std::io::Read::read_to_string(&mut file, &mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "{} is in use by another {what} ({}); wait for it to finish or choose another folder",
                dir.display(),
                if holder.is_empty() { "holder unknown" } else { holder }
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = format!(
        "pid {} on host {}, since {since} (Unix time)",
        std::process::id(),
        host.trim()
    );
    file.set_len(0)
        .and_then(|_| std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)))
        .and_then(|_| file.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write the lock file {}", path.display()))?;
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path(), "trainer fit").unwrap();
        let err = format!("{:#}", lock_dir(dir.path(), "trainer fit").err().unwrap());
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        lock_dir(dir.path(), "trainer fit").unwrap();
    }

    #[test]
    fn stale_temporaries_are_removed_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".last.ckpt.a1B2c3.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join("last.ckpt"), b"whole").unwrap();
        std::fs::write(dir.path().join("notes.tmp"), b"user file").unwrap();
        let young = remove_stale_temporaries(dir.path(), std::time::Duration::from_secs(3600));
        assert_eq!(young, 0);
        assert_eq!(
            remove_stale_temporaries(dir.path(), std::time::Duration::ZERO),
            1
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["last.ckpt", "notes.tmp"]);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_names_are_told_from_other_files() {
        assert_eq!(
            temp_name(".last.ckpt.Xy12ab.tmp"),
            Some(TempName::Data { dest: "last.ckpt" })
        );
        assert_eq!(
            temp_name(".w.hdf5.abcDEF1234.tmp.lock"),
            Some(TempName::Lock { dest: "w.hdf5" })
        );
        for other in [
            "notes.tmp",
            ".tmp",
            ".x.tmp",
            ".x.ab-cd!.tmp",
            ".lock",
            "x.abcdef.tmp",
        ] {
            assert_eq!(temp_name(other), None, "{other}");
        }
    }

    #[test]
    fn a_planted_link_as_lock_file_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(&victim, run.join(".lock")).unwrap();
        let err = format!("{:#}", lock_dir(&run, "trainer fit").err().unwrap());
        assert!(
            err.contains("symbolic link") && err.contains(".lock"),
            "{err}"
        );
        // A second name of the user's file (a hard link) is refused too.
        std::fs::remove_file(run.join(".lock")).unwrap();
        std::fs::hard_link(&victim, run.join(".lock")).unwrap();
        let err = format!("{:#}", lock_dir(&run, "trainer fit").err().unwrap());
        assert!(err.contains("not a lock file"), "{err}");
        assert!(open_lock_file(&run.join(".lock")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn temporaries_are_created_private_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic_with(&path, |f| {
            let mode = f.metadata()?.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            Ok(())
        })
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("link")).unwrap();
        assert!(create_new(&dir.path().join("link")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_live_writers_temporary_stays_and_a_dead_writers_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        // While this process writes (holding the lock), a clean-up leaves the temporary.
        write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 0);
            assert_eq!(names(dir.path()).len(), 1);
            Ok(())
        })
        .unwrap();
        // An unlocked temporary (its writer is gone), however young, goes.
        std::fs::write(dir.path().join(".out.json.Ab12Cd34Ef.tmp"), b"half").unwrap();
        // One whose lock a live process holds stays.
        let live = dir.path().join(".other.json.Zz98Yy76Xx.tmp");
        std::fs::write(&live, b"half").unwrap();
        let holder = File::open(&live).unwrap();
        holder.lock().unwrap();
        assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 1);
        assert_eq!(
            names(dir.path()),
            [".other.json.Zz98Yy76Xx.tmp", "out.json"]
        );
        drop(holder);
        assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 1);
        assert_eq!(names(dir.path()), ["out.json"]);
    }

    #[test]
    fn a_writer_by_path_is_known_alive_by_its_companion_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.hdf5");
        write_atomic_path(&path, |tmp| {
            // The library may take its own lock on the file it opens by path.
            let lib = File::options().read(true).write(true).open(tmp)?;
            lib.try_lock()?;
            std::fs::write(tmp, b"weights")?;
            drop(lib);
            // With the library's lock released, the companion's still marks it alive.
            assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 0);
            assert_eq!(names(dir.path()).len(), 2, "{:?}", names(dir.path()));
            Ok(())
        })
        .unwrap();
        assert_eq!(names(dir.path()), ["w.hdf5"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"weights");
        // A killed writer's pair (no lock held), and a lone companion, go.
        std::fs::write(dir.path().join(".w.hdf5.Qq11Ww22Ee.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join(".w.hdf5.Qq11Ww22Ee.tmp.lock"), b"").unwrap();
        std::fs::write(dir.path().join(".w.hdf5.Rr33Tt44Yy.tmp.lock"), b"").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 2);
        assert_eq!(names(dir.path()), ["w.hdf5"]);
    }

    #[test]
    fn a_link_named_like_a_temporary_is_neither_followed_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join(".victim.Ab12Cd34Ef.tmp");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".x.Ab12Cd34Ef.tmp.lock")).unwrap();
        assert_eq!(remove_stale_temporaries(dir.path(), Duration::ZERO), 0);
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"good").unwrap();
        let err = write_atomic_with(&path, |_| anyhow::bail!("disk full")).unwrap_err();
        assert!(format!("{err:#}").contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
