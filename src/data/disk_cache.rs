//! Decoded images on disk: a dataset is decoded once into a uint8 file that later runs (and the
//! other ranks of a job) map into memory instead of decoding again. The file is found by a key
//! of every image's path, size and modification time, the input size and the preprocessing
//! version, so a changed dataset gets a new one; a file whose length or SHA-256 does not match
//! its description is rebuilt. Datasets larger than memory train from the page cache.

use std::fs::File;
use std::io::{Read, Write};
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

/// What `<key>.json` says of `<key>.pixels`.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
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

/// The key of a dataset's decoded images.
fn key(samples: &[Sample], size: usize) -> String {
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

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
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
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the image cache folder {}", dir.display()))?;
    let key = key(&samples, size);
    let (pixels_path, json_path) = (
        dir.join(format!("{key}.pixels")),
        dir.join(format!("{key}.json")),
    );
    let lock = File::create(dir.join(format!("{key}.lock")))
        .with_context(|| format!("cannot write in the image cache folder {}", dir.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", dir.display()))?;
    let reused = match check(&json_path, &pixels_path, samples.len(), size) {
        Ok(desc) => Some(desc),
        Err(e) => {
            if json_path.exists() {
                eprintln!("image cache {}: {e:#}; decoding again", json_path.display());
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
        eprintln!("skipped {reason}");
    }
    super::dataset::check_every_folder_kept(root, &samples, &desc.kept)?;
    let _ = File::options()
        .append(true)
        .open(&json_path)
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

/// The description, when it and the pixel file are whole and belong to this dataset.
fn check(json: &Path, pixels: &Path, samples: usize, size: usize) -> Result<Description> {
    let text = std::fs::read_to_string(json).context("no description")?;
    let desc: Description = serde_json::from_str(&text).context("unreadable description")?;
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
    let len = std::fs::metadata(pixels).context("no pixel file")?.len();
    if len != desc.bytes {
        bail!("the pixel file has {len} bytes, not {}", desc.bytes);
    }
    if sha256_of(pixels)? != desc.sha256 {
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
        preprocessing_version: PREPROCESSING_VERSION,
        size,
        samples: samples.len(),
        kept,
        skipped,
        bytes: pixels.len() as u64,
        sha256: format!("{:x}", h.finalize()),
    };
    let write = |name: String, bytes: &[u8]| -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(dir.join(name))?;
        Ok(())
    };
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

/// Removes the entries (pixels, description, lock) whose description was not used for a month.
fn remove_unused(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > UNUSED_FOR);
        if path.extension().is_some_and(|e| e == "json") && stem != keep && old {
            for ext in ["pixels", "json", "lock"] {
                let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
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
    let file = File::open(pixels).with_context(|| format!("cannot open {}", pixels.display()))?;
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
