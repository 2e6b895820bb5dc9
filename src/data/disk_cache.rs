//! Decoded images on disk: a dataset is decoded once into a uint8 file that later runs (and the
//! other ranks of a job) map into memory instead of decoding again. The file is found by a key
//! of every image's path, size and modification time, the input size and the preprocessing
//! version, so a changed dataset gets a new one; a file whose length or SHA-256 does not match
//! its description is rebuilt. Datasets larger than memory train from the page cache.
//!
//! The folder is made private (0700). Nothing in it is opened through a symbolic link or unless
//! it is a plain file of this user, and clean-up removes only what the cache wrote: `<key>.json`
//! descriptions carrying [`FORMAT`], the `<key>.pixels` and `<key>.lock` beside them, and the
//! temporaries of such names whose writer is gone.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::dataset::{decode_samples, Decoded, ImageCache, Sample};
use super::taxonomy::Taxonomy;

/// Bumped whenever decoding or resizing changes what a file holds.
pub const PREPROCESSING_VERSION: u32 = 1;
/// Entries not used for this long are removed when a new one is written.
const UNUSED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// The first field of every description: what tells the cache's own files from others.
pub const FORMAT: &str = "trainer decoded-image cache";
/// The largest description read (its lists hold one entry per sample).
const DESCRIPTION_MAX: u64 = 512 << 20;

/// What `<key>.json` says of `<key>.pixels`.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    format: String,
    preprocessing_version: u32,
    size: usize,
    samples: usize,
    /// Indices of the decoded samples (in the dataset's order); their pixels follow each other.
    kept: Vec<usize>,
    /// The samples that could not be decoded: index and reason.
    skipped: Vec<(usize, String)>,
    bytes: u64,
    sha256: String,
}

/// The key of a dataset's decoded images: its files in the cache folder are `<key>.pixels`,
/// `<key>.json` and `<key>.lock`.
pub fn key(samples: &[Sample], size: usize) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "trainer images v{PREPROCESSING_VERSION} size {size}\n"
    ));
    for s in samples {
        let meta = std::fs::metadata(&s.path);
        let (len, mtime) = match &meta {
            Ok(m) => (
                m.len(),
                m.modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos()),
            ),
            Err(_) => (u64::MAX, 0),
        };
        h.update(s.path.to_string_lossy().as_bytes());
        h.update(format!("\0{}\0{len}\0{mtime}\n", s.folder));
    }
    format!("{:x}", h.finalize())
}

fn sha256_of(mut f: &File) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// How the images were had, for the "data:" line.
pub struct Provenance {
    pub file: PathBuf,
    pub reused: bool,
    pub seconds: f64,
}

/// The decoded images of `samples` from `dir`'s file for them, made first if it is missing or
/// damaged. Concurrent callers (the ranks of a job) take turns: one decodes, the others then map
/// its file.
pub fn load(
    dir: &Path,
    root: &Path,
    samples: Vec<Sample>,
    taxonomy: &Taxonomy,
    size: usize,
) -> Result<(ImageCache, Provenance)> {
    let t0 = Instant::now();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the image cache folder {}", dir.display()))?;
    let key = key(&samples, size);
    let (pixels_path, json_path) = (
        dir.join(format!("{key}.pixels")),
        dir.join(format!("{key}.json")),
    );
    let lock = crate::fsutil::open_lock_file(&dir.join(format!("{key}.lock")))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    crate::fsutil::remove_stale_temporaries_of(dir, Duration::ZERO, |dest| {
        entry_key(dest).is_some()
    });
    let reused = match check(&json_path, &pixels_path, samples.len(), size) {
        Ok(desc) => Some(desc),
        Err(e) => {
            if std::fs::symlink_metadata(&json_path).is_ok() {
                crate::errln!("image cache {}: {e:#}; decoding again", json_path.display());
            }
            None
        }
    };
    let was_reused = reused.is_some();
    let desc = match reused {
        Some(d) => d,
        None => build(dir, &key, root, &samples, size)?,
    };
    drop(lock);
    for (_, reason) in &desc.skipped {
        crate::errln!("skipped {reason}");
    }
    super::dataset::check_every_folder_kept(root, &samples, &desc.kept)?;
    let _ = crate::fsutil::open_own_file(&json_path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    let cache = map(&pixels_path, &desc, samples, taxonomy, size)?;
    Ok((
        cache,
        Provenance {
            file: pixels_path,
            reused: was_reused,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// `<key>` of a cache file's name `<key>.pixels` or `<key>.json` (a key is 64 hex digits).
fn entry_key(name: &str) -> Option<&str> {
    let (key, ext) = name.rsplit_once('.')?;
    let hex = key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hex && matches!(ext, "pixels" | "json")).then_some(key)
}

/// A description the cache wrote (of this format), read without following a link.
fn read_description(json: &Path) -> Result<Description> {
    let file = crate::fsutil::open_own_file(json).context("no description of this cache")?;
    let mut text = String::new();
    file.take(DESCRIPTION_MAX)
        .read_to_string(&mut text)
        .context("unreadable description")?;
    let desc: Description = serde_json::from_str(&text).context("unreadable description")?;
    if desc.format != FORMAT {
        bail!("not a description of this cache");
    }
    Ok(desc)
}

/// The description, when it and the pixel file are whole and belong to this dataset.
fn check(json: &Path, pixels: &Path, samples: usize, size: usize) -> Result<Description> {
    let desc = read_description(json)?;
    let expected = (desc.kept.len() * size * size * 3) as u64;
    let indices_ok = desc.kept.windows(2).all(|w| w[0] < w[1])
        && desc
            .kept
            .iter()
            .chain(desc.skipped.iter().map(|(i, _)| i))
            .all(|&i| i < samples);
    if desc.preprocessing_version != PREPROCESSING_VERSION
        || desc.size != size
        || desc.samples != samples
        || desc.bytes != expected
        || !indices_ok
    {
        bail!("its description does not match this dataset");
    }
    let file = crate::fsutil::open_own_file(pixels).context("no pixel file of this cache")?;
    let len = file.metadata().context("no pixel file")?.len();
    if len != desc.bytes {
        bail!("the pixel file has {len} bytes, not {}", desc.bytes);
    }
    if sha256_of(&file)? != desc.sha256 {
        bail!("the pixel file's SHA-256 does not match (damaged)");
    }
    Ok(desc)
}

/// Decodes the samples and writes `<key>.pixels`, then `<key>.json` (last: a file with a
/// description is complete), each atomically; removes entries unused for a month.
fn build(
    dir: &Path,
    key: &str,
    root: &Path,
    samples: &[Sample],
    size: usize,
) -> Result<Description> {
    let Decoded {
        kept,
        pixels,
        skipped,
    } = decode_samples(root, samples, size)?;
    let mut h = Sha256::new();
    h.update(&pixels);
    let desc = Description {
        format: FORMAT.into(),
        preprocessing_version: PREPROCESSING_VERSION,
        size,
        samples: samples.len(),
        kept,
        skipped,
        bytes: pixels.len() as u64,
        sha256: format!("{:x}", h.finalize()),
    };
    let write = |name: String, bytes: &[u8]| crate::fsutil::write_atomic(&dir.join(name), bytes);
    write(format!("{key}.pixels"), &pixels)
        .and_then(|_| {
            write(
                format!("{key}.json"),
                serde_json::to_string(&desc)?.as_bytes(),
            )
        })
        .with_context(|| format!("cannot write the image cache in {}", dir.display()))?;
    remove_unused(dir, key);
    Ok(desc)
}

/// Removes the entries (pixels, description, lock) whose description was not used for a month:
/// only descriptions this cache wrote, and only plain files of this user beside them.
fn remove_unused(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|s| s.to_str()) else {
            continue;
        };
        let Some(key) = entry_key(name).filter(|_| name.ends_with(".json")) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > UNUSED_FOR);
        if key == keep || !old || read_description(&path).is_err() {
            continue;
        }
        // Not while another process holds the entry's lock (it is reading or writing it).
        let lock_path = dir.join(format!("{key}.lock"));
        let lock = crate::fsutil::open_own_file(&lock_path).ok();
        if lock.as_ref().is_some_and(|l| l.try_lock().is_err()) {
            continue;
        }
        for p in [dir.join(format!("{key}.pixels")), lock_path, path] {
            if crate::fsutil::is_own_path(&p) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// The pixel file mapped into memory as the cache's tensor.
fn map(
    pixels: &Path,
    desc: &Description,
    samples: Vec<Sample>,
    taxonomy: &Taxonomy,
    size: usize,
) -> Result<ImageCache> {
    let file = crate::fsutil::open_own_file(pixels)
        .with_context(|| format!("cannot open {}", pixels.display()))?;
    let kept: Vec<Sample> = desc.kept.iter().map(|&i| samples[i].clone()).collect();
    let n = kept.len() as i64;
    let s = size as i64;
    // SAFETY: cache files are only ever replaced by rename, never written in place, so the
    // mapping stays valid while it lives; the cache holds it as long as its tensor.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", pixels.display()))?;
    // SAFETY: the mapping holds n * s * s * 3 bytes (its length was checked against the
    // description), and outlives the tensor, which the cache drops with it.
    let t = unsafe {
        Tensor::from_blob(
            map.as_ptr(),
            &[n, s, s, 3],
            &[s * s * 3, s * 3, 3, 1],
            Kind::Uint8,
            tch::Device::Cpu,
        )
    };
    Ok(ImageCache::with_backing(
        kept,
        t,
        taxonomy,
        size,
        Box::new(map),
    ))
}
