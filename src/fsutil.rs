//! Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, flushed and synced,
/// then renamed over the destination.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`] for writers that need a file handle (PNG encoders...). `write` gets
/// the temporary file; it is renamed into place only if `write` succeeds.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    write_atomic_path(path, |tmp| {
        let mut file = std::fs::OpenOptions::new().write(true).open(tmp)?;
        write(&mut file)?;
        file.sync_all().with_context(|| {
            format!(
                "cannot write {} (sync failed; is the disk full?)",
                path.display()
            )
        })
    })
}

/// Like [`write_atomic`] for writers that open the file themselves by path (HDF5): `write` gets
/// the path of an empty temporary file in the destination's folder, which is renamed into place
/// only if `write` succeeds, and removed otherwise.
pub fn write_atomic_path(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    write(tmp.path()).with_context(|| format!("cannot write {}", path.display()))?;
    // Temporary files are private (0600); the finished file gets the usual permissions.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| {
        format!(
            "cannot move the finished file into place at {}",
            path.display()
        )
    })?;
    Ok(())
}

/// Removes the temporaries [`write_atomic`] leaves behind when a process is killed mid-write
/// (`.<name>.<random>.tmp`) from `dir`, if they are older than `min_age` (zero: all of them, for
/// a folder this process holds the lock of). Returns how many were removed.
pub fn remove_stale_temporaries(dir: &Path, min_age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// An exclusive lock on a folder, held while this value lives (an advisory `flock` on
/// `<dir>/.lock`, released by the kernel when the process ends, so a crashed holder never leaves
/// a stale lock). The file names the holder for the message another process gets.
pub struct DirLock {
    _file: std::fs::File,
}

/// Takes the lock of `dir` (which must exist), or says who holds it.
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock> {
    let path = dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
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
