//! A training dataset: one folder per tag under a root (`datasetpdm/<tag>/<image>`), expanded to
//! target vectors by a [`Taxonomy`], decoded once into a uint8 cache.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use tch::Tensor;

use super::decode::load_resized;
use super::taxonomy::{self, Taxonomy};
use crate::progress;

/// One image of the dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    /// Its folder (tag) name.
    pub folder: String,
}

/// The tag folders under `root`, sorted.
pub fn tag_folders(root: &Path) -> Result<Vec<String>> {
    if !root.is_dir() {
        bail!(
            "dataset folder {} does not exist or is not a folder",
            root.display()
        );
    }
    let mut folders: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read dataset folder {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    folders.sort();
    Ok(folders)
}

/// Reads a taxonomy file: `{"labels": [...], "folders": {"<folder>": ["<label>", ...]}}`, at most
/// [`taxonomy::MAX_FILE_BYTES`], checked by [`Taxonomy::validate`]. Every error names the file.
pub fn read_taxonomy(path: &Path) -> Result<Taxonomy> {
    let shown = path.display();
    let Some(text) = crate::fsutil::read_text_bounded(path, taxonomy::MAX_FILE_BYTES)
        .with_context(|| format!("cannot read taxonomy {shown}"))?
    else {
        bail!(
            "{shown}: larger than any taxonomy (limit {} bytes)",
            taxonomy::MAX_FILE_BYTES
        );
    };
    let t: Taxonomy = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{shown}: not a taxonomy ({e}; expected {{\"labels\": [...], \"folders\": {{...}}}})"
        )
    })?;
    t.validate().map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    Ok(t)
}

/// The taxonomy for a dataset: the given file, else the built-in NDL one. Every folder must be
/// one of its tags.
pub fn resolve_taxonomy(root: &Path, folders: &[String], file: Option<&Path>) -> Result<Taxonomy> {
    let taxonomy = match file {
        Some(f) => read_taxonomy(f)?,
        None => Taxonomy::ndl(),
    };
    check_folders(
        root,
        folders,
        &taxonomy,
        "For another collection, describe its tags with --taxonomy FILE.",
    )?;
    Ok(taxonomy)
}

/// Every folder must be a tag of the taxonomy; the error lists the unknown and the known ones.
fn check_folders(root: &Path, folders: &[String], taxonomy: &Taxonomy, hint: &str) -> Result<()> {
    let unknown: Vec<&str> = folders
        .iter()
        .filter(|f| !taxonomy.folders.contains_key(*f))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        // At most 30 of each list: a taxonomy may have thousands of folders.
        let listed = |names: Vec<&str>| -> String {
            let more = names.len().saturating_sub(30);
            let mut text = names[..names.len().min(30)].join(", ");
            if more > 0 {
                text += &format!(" and {more} more");
            }
            text
        };
        let known: Vec<&str> = taxonomy.folders.keys().map(String::as_str).collect();
        bail!(
            "{}: unknown tag folder(s): {}. Known tags: {}. ({hint})",
            root.display(),
            listed(unknown),
            listed(known)
        );
    }
    Ok(())
}

/// Every file under the tag folders, sorted by path.
pub fn scan(root: &Path, folders: &[String]) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for folder in folders {
        let dir = root.join(folder);
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            // Everything but folders: a broken link or a pipe is then reported by path.
            if !path.is_dir() && !hidden {
                samples.push(Sample {
                    path,
                    folder: folder.clone(),
                });
            }
        }
    }
    // By the path as a string, as Python's sorted() orders the original's list.
    samples.sort_by(|a, b| a.path.to_string_lossy().cmp(&b.path.to_string_lossy()));
    Ok(samples)
}

/// Decoded images, resized to the model's input, in one uint8 tensor (N, S, S, 3), BGR.
pub struct ImageCache {
    pub samples: Vec<Sample>,
    pub pixels: Tensor,
    /// 0/1 targets (N, labels).
    pub targets: Tensor,
    pub size: usize,
    /// What holds the pixels' memory when the tensor does not own it (a mapped file).
    _backing: Box<dyn std::any::Any + Send>,
}

impl ImageCache {
    /// The cache of the decoded `kept` samples with their `pixels` (N, S, S, 3), whose memory
    /// `backing` holds where the tensor does not own it.
    pub fn with_backing(
        kept: Vec<Sample>,
        pixels: Tensor,
        taxonomy: &Taxonomy,
        size: usize,
        backing: Box<dyn std::any::Any + Send>,
    ) -> ImageCache {
        // One target vector per folder, copied for each of its images.
        let mut per_folder: HashMap<&str, Vec<f32>> = HashMap::new();
        let mut targets: Vec<f32> = Vec::with_capacity(kept.len() * taxonomy.labels.len());
        for s in &kept {
            let target = per_folder
                .entry(s.folder.as_str())
                .or_insert_with(|| taxonomy.target(&s.folder).expect("folders were checked"));
            targets.extend_from_slice(target);
        }
        let labels = taxonomy.labels.len() as i64;
        ImageCache {
            targets: Tensor::from_slice(&targets).view([kept.len() as i64, labels]),
            samples: kept,
            pixels,
            size,
            _backing: backing,
        }
    }
}

/// The decoded samples: their indices, their pixels one after the other, and what could not be
/// decoded (index, message with the path).
pub struct Decoded {
    pub kept: Vec<usize>,
    pub pixels: Vec<u8>,
    pub skipped: Vec<(usize, String)>,
}

/// Decodes every sample in parallel. Unreadable files are left out (listed in `skipped`); a tag
/// folder left with no image, or a dataset with none at all, is an error.
pub fn decode_samples(root: &Path, samples: &[Sample], size: usize) -> Result<Decoded> {
    if samples.is_empty() {
        bail!(
            "{}: the dataset is empty (no files in its tag folders)",
            root.display()
        );
    }
    let bar = progress::bar(samples.len() as u64, "images");
    bar.set_prefix("decode");
    let decoded: Vec<_> = samples
        .par_iter()
        .map(|s| {
            let r = load_resized(&s.path, size);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    let mut out = Decoded {
        kept: Vec::with_capacity(samples.len()),
        pixels: Vec::with_capacity(samples.len() * size * size * 3),
        skipped: Vec::new(),
    };
    for (i, r) in decoded.into_iter().enumerate() {
        match r {
            Ok(p) => {
                out.pixels.extend_from_slice(&p);
                out.kept.push(i);
            }
            Err(e) => out.skipped.push((i, e.to_string())),
        }
    }
    check_every_folder_kept(root, samples, &out.kept)?;
    Ok(out)
}

/// Every tag folder must keep at least one decoded image.
pub fn check_every_folder_kept(root: &Path, samples: &[Sample], kept: &[usize]) -> Result<()> {
    let mut per_folder: BTreeMap<&str, usize> = BTreeMap::new();
    for s in samples {
        per_folder.entry(s.folder.as_str()).or_default();
    }
    for &i in kept {
        *per_folder
            .get_mut(samples[i].folder.as_str())
            .expect("folder") += 1;
    }
    if let Some((folder, _)) = per_folder.iter().find(|(_, n)| **n == 0) {
        bail!(
            "{}: tag folder {folder} has no readable image",
            root.join(folder).display()
        );
    }
    Ok(())
}

/// Decodes every sample into memory (see [`decode_samples`]); the unreadable ones are reported.
pub fn load_cache(
    root: &Path,
    samples: Vec<Sample>,
    taxonomy: &Taxonomy,
    size: usize,
) -> Result<ImageCache> {
    let Decoded {
        kept,
        pixels,
        skipped,
    } = decode_samples(root, &samples, size)?;
    for (_, reason) in &skipped {
        crate::errln!("skipped {reason}");
    }
    let s = size as i64;
    let pixels = Tensor::from_slice(&pixels).view([kept.len() as i64, s, s, 3]);
    let kept = kept.into_iter().map(|i| samples[i].clone()).collect();
    Ok(ImageCache::with_backing(
        kept,
        pixels,
        taxonomy,
        size,
        Box::new(()),
    ))
}

/// The tag folders and files of a dataset, with its taxonomy (the file's, else the NDL one).
/// A root with no tag folder at all is an error too.
pub fn open(root: &Path, taxonomy_file: Option<&Path>) -> Result<(Taxonomy, Vec<Sample>)> {
    let folders = non_empty_tag_folders(root)?;
    let taxonomy = resolve_taxonomy(root, &folders, taxonomy_file)?;
    let samples = scan(root, &folders)?;
    Ok((taxonomy, samples))
}

/// Like [`open`] with a given taxonomy (a model's), which every folder must belong to.
pub fn open_with(root: &Path, taxonomy: &Taxonomy) -> Result<Vec<Sample>> {
    let folders = non_empty_tag_folders(root)?;
    check_folders(
        root,
        &folders,
        taxonomy,
        "The model's taxonomy has no such tag.",
    )?;
    scan(root, &folders)
}

fn non_empty_tag_folders(root: &Path) -> Result<Vec<String>> {
    let folders = tag_folders(root)?;
    if folders.is_empty() {
        bail!(
            "{}: no tag folders (expected {}/<tag>/<image>)",
            root.display(),
            root.display()
        );
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_folders_are_listed_with_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["stamp", "cats", "dogs"] {
            std::fs::create_dir_all(dir.path().join(f)).unwrap();
        }
        let err = open(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("unknown tag folder(s): cats, dogs"), "{err}");
        assert!(err.contains("Known tags: graphic_graph"), "{err}");
    }

    #[test]
    fn long_folder_lists_are_cut_in_the_message() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::create_dir_all(dir.path().join(format!("u{i:02}"))).unwrap();
        }
        let taxonomy = Taxonomy {
            labels: vec!["a".into()],
            folders: (0..100).map(|i| (format!("k{i:03}"), vec![])).collect(),
        };
        let err = open_with(dir.path(), &taxonomy).unwrap_err().to_string();
        assert!(
            err.contains("u00, u01") && err.contains("u29 and 10 more."),
            "{err}"
        );
        assert!(err.contains("k029 and 70 more."), "{err}");
    }

    #[test]
    fn samples_are_sorted_as_python_sorts_path_strings() {
        let dir = tempfile::tempdir().unwrap();
        for (folder, file) in [("a", "x.jpg"), ("a-b", "y.jpg"), ("a", "W.jpg")] {
            std::fs::create_dir_all(dir.path().join(folder)).unwrap();
            std::fs::write(dir.path().join(folder).join(file), b"x").unwrap();
        }
        let samples = scan(dir.path(), &["a".into(), "a-b".into()]).unwrap();
        let rel: Vec<String> = samples
            .iter()
            .map(|s| {
                s.path
                    .strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // sorted(["a/x.jpg", "a-b/y.jpg", "a/W.jpg"]) == ["a-b/y.jpg", "a/W.jpg", "a/x.jpg"]
        assert_eq!(rel, ["a-b/y.jpg", "a/W.jpg", "a/x.jpg"]);
    }

    #[test]
    fn taxonomy_file_replaces_the_builtin_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/cats")).unwrap();
        std::fs::write(dir.path().join("data/cats/a.jpg"), b"x").unwrap();
        let tax = dir.path().join("t.json");
        std::fs::write(
            &tax,
            r#"{"labels": ["animal", "cat"], "folders": {"cats": ["animal", "cat"]}}"#,
        )
        .unwrap();
        let (t, samples) = open(&dir.path().join("data"), Some(&tax)).unwrap();
        assert_eq!(t.target("cats").unwrap(), [1.0, 1.0]);
        assert_eq!(samples.len(), 1);
        std::fs::write(
            &tax,
            r#"{"labels": ["animal"], "folders": {"cats": ["cat"]}}"#,
        )
        .unwrap();
        let err = open(&dir.path().join("data"), Some(&tax))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the label list"), "{err}");
    }
}
