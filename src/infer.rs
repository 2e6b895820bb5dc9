//! `trainer infer`: folders of images -> one JSON file per folder, in the original format
//! (`{"<file stem>": [{"tag": "...", "confidence": 0.873}, ...]}`).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::data::decode::load_resized;
use crate::fsutil::write_atomic;
use crate::model::LoadedModel;
use crate::progress;

/// One output file: the images of one input folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folder {
    /// The JSON file's name without `.json`: the subfolder's name (the book's PID).
    pub name: String,
    /// Files in the folder, sorted by name.
    pub files: Vec<PathBuf>,
}

/// Settings of one `infer` run.
#[derive(Clone, Debug)]
pub struct InferOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// One threshold for every label; `None` uses the model's own.
    pub threshold: Option<f32>,
    pub batch_size: usize,
}

/// What an `infer` run did.
#[derive(Debug, Default)]
pub struct InferSummary {
    pub folders_written: usize,
    pub images_tagged: usize,
    /// Files that could not be used, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    pub seconds: f64,
    pub interrupted: bool,
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !is_hidden(p))
        .collect();
    entries.sort();
    Ok(entries)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The folders to tag: each subfolder of `input`, plus the files directly inside `input` (written
/// to a file named after `input`). Every file is tried; what is not an image is reported later.
pub fn discover(input: &Path) -> Result<Vec<Folder>> {
    if !input.is_dir() {
        bail!(
            "input folder {} does not exist or is not a folder",
            input.display()
        );
    }
    let mut folders = Vec::new();
    let mut loose = Vec::new();
    for entry in sorted_entries(input)? {
        if entry.is_dir() {
            // Everything but folders: a broken link or a pipe is then reported by path.
            let files = sorted_entries(&entry)?
                .into_iter()
                .filter(|p| !p.is_dir())
                .collect();
            let name = entry
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            folders.push(Folder { name, files });
        } else {
            loose.push(entry);
        }
    }
    if !loose.is_empty() {
        let canonical = input.canonicalize().unwrap_or_else(|_| input.to_path_buf());
        let name = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "images".into());
        folders.insert(0, Folder { name, files: loose });
    }
    check_distinct_names(input, &folders)?;
    Ok(folders)
}

/// Two folders must never write the same JSON file: the loose images of `input` and a subfolder
/// named like `input`, or two folder names that are the same once made printable.
fn check_distinct_names(input: &Path, folders: &[Folder]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, folder) in folders.iter().enumerate() {
        if let Some(first) = seen.insert(folder.name.as_str(), i) {
            let loose = first == 0 && folders[0].files.iter().any(|f| f.parent() == Some(input));
            if loose {
                bail!(
                    "{}: its loose images and its subfolder {}/ would both be written to {}.json; move the loose images into a subfolder of their own",
                    input.display(),
                    folder.name,
                    folder.name
                );
            }
            bail!(
                "{}: two subfolders would both be written to {}.json (their names differ only in bytes that are not valid UTF-8); rename one",
                input.display(),
                folder.name
            );
        }
    }
    Ok(())
}

/// The tags of one image: labels whose probability is above the threshold (every label when the
/// threshold is 0 or less), in label order, confidence rounded to 3 decimals.
pub fn tags(probs: &[f32], labels: &[String], thresholds: &[f32]) -> Value {
    let list = probs
        .iter()
        .zip(labels)
        .zip(thresholds)
        .filter(|((p, _), t)| **t <= 0.0 || **p > **t)
        .map(|((p, label), _)| {
            let mut m = Map::new();
            m.insert("tag".into(), Value::from(label.as_str()));
            m.insert("confidence".into(), Value::from(round3(*p)));
            Value::Object(m)
        })
        .collect();
    Value::Array(list)
}

/// Python's `round(x, 3)` for a probability.
fn round3(p: f32) -> f64 {
    (p as f64 * 1000.0).round() / 1000.0
}

/// JSON as Python's `json.dump` writes it by default: `", "` and `": "` separators, non-ASCII
/// characters escaped.
pub fn to_python_json(value: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    serde::Serialize::serialize(value, &mut ser).expect("serialising a JSON value cannot fail");
    String::from_utf8(out).expect("ASCII output")
}

struct PythonFormatter;

/// Python's item separator `", "` before every item but the first.
fn item_separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// A decoded batch: for each file, its index in the flat list and either pixels or an error.
type Decoded = Vec<(usize, Result<Vec<u8>, String>)>;

/// Tags every folder under `opts.input` and writes `opts.output/<name>.json` for each.
pub fn run(model: &LoadedModel, opts: &InferOptions) -> Result<InferSummary> {
    let start = Instant::now();
    let folders = discover(&opts.input)?;
    if folders.is_empty() {
        bail!(
            "{}: no images and no subfolders to tag",
            opts.input.display()
        );
    }
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("cannot create output folder {}", opts.output.display()))?;
    // What a killed run left half-written (a running one writes each file in well under this).
    crate::fsutil::remove_stale_temporaries(&opts.output, std::time::Duration::from_secs(600));
    let thresholds = match opts.threshold {
        Some(t) => vec![t; model.taxonomy.labels.len()],
        None => model.thresholds.clone(),
    };
    let files: Vec<(usize, PathBuf)> = folders
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.files.iter().map(move |p| (i, p.clone())))
        .collect();
    let mut remaining: Vec<usize> = folders.iter().map(|f| f.files.len()).collect();
    let mut results: Vec<Map<String, Value>> = vec![Map::new(); folders.len()];
    let mut summary = InferSummary::default();
    let bar = progress::bar(files.len() as u64, "images");
    bar.set_prefix("infer");

    // Empty folders are written at once, as `{}`.
    for (i, folder) in folders.iter().enumerate() {
        if folder.files.is_empty() {
            write_folder(&opts.output, folder, &results[i])?;
            summary.folders_written += 1;
        }
    }

    let size = model.image_size;
    let batch = opts.batch_size.max(1);
    let (tx, rx) = mpsc::sync_channel::<Decoded>(2);
    let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
    let producer = std::thread::spawn(move || {
        for (chunk_index, chunk) in paths.chunks(batch).enumerate() {
            if progress::interrupted() {
                break;
            }
            let decoded: Decoded = chunk
                .par_iter()
                .enumerate()
                .map(|(j, p)| {
                    (
                        chunk_index * batch + j,
                        load_resized(p, size).map_err(|e| e.to_string()),
                    )
                })
                .collect();
            if tx.send(decoded).is_err() {
                break;
            }
        }
    });

    for decoded in rx {
        if progress::interrupted() {
            summary.interrupted = true;
            break;
        }
        let mut pixels = Vec::with_capacity(decoded.len() * size * size * 3);
        let mut ok = Vec::with_capacity(decoded.len());
        for (index, result) in decoded.iter() {
            match result {
                Ok(p) => {
                    pixels.extend_from_slice(p);
                    ok.push(*index);
                }
                Err(reason) => {
                    bar.suspend(|| eprintln!("skipped {reason}"));
                    summary
                        .skipped
                        .push((files[*index].1.clone(), reason.clone()));
                }
            }
        }
        let probs = if ok.is_empty() {
            Vec::new()
        } else {
            model.predict(&pixels, ok.len())?
        };
        let n_labels = model.taxonomy.labels.len();
        for (k, index) in ok.iter().enumerate() {
            let (folder, path) = &files[*index];
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let value = tags(
                &probs[k * n_labels..(k + 1) * n_labels],
                &model.taxonomy.labels,
                &thresholds,
            );
            if results[*folder].insert(stem.clone(), value).is_some() {
                bar.suspend(|| eprintln!("warning: {}: another file in this folder has the stem '{stem}'; the last one is kept", path.display()));
            }
            summary.images_tagged += 1;
        }
        for (index, _) in decoded.iter() {
            let folder = files[*index].0;
            remaining[folder] -= 1;
            if remaining[folder] == 0 {
                write_folder(&opts.output, &folders[folder], &results[folder])?;
                summary.folders_written += 1;
            }
        }
        bar.inc(decoded.len() as u64);
    }
    if progress::interrupted() {
        summary.interrupted = true;
    }
    producer.join().expect("decoding thread panicked");
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn write_folder(output: &Path, folder: &Folder, result: &Map<String, Value>) -> Result<()> {
    let path = output.join(format!("{}.json", folder.name));
    write_atomic(
        &path,
        to_python_json(&Value::Object(result.clone())).as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    #[test]
    fn tags_are_above_threshold_in_label_order_rounded() {
        let v = tags(&[0.87349, 0.4, 0.99961], &labels(), &[0.4; 3]);
        assert_eq!(
            to_python_json(&v),
            r#"[{"tag": "a", "confidence": 0.873}, {"tag": "c", "confidence": 1.0}]"#
        );
    }

    #[test]
    fn threshold_zero_lists_every_label() {
        let v = tags(&[0.0, 0.5, 1e-9], &labels(), &[0.0; 3]);
        assert_eq!(v.as_array().unwrap().len(), 3);
        assert_eq!(v[0]["confidence"], 0.0);
    }

    #[test]
    fn per_label_thresholds_apply() {
        let v = tags(&[0.3, 0.3, 0.3], &labels(), &[0.2, 0.5, 0.29]);
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tag"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn python_json_escapes_non_ascii() {
        let mut m = Map::new();
        m.insert("図1".into(), Value::Array(vec![]));
        assert_eq!(to_python_json(&Value::Object(m)), r#"{"\u56f31": []}"#);
    }

    #[test]
    fn discover_puts_loose_files_first_under_the_folder_name() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("scans");
        std::fs::create_dir_all(input.join("b2")).unwrap();
        std::fs::create_dir_all(input.join("a1")).unwrap();
        std::fs::write(input.join("b2/y.jpg"), b"x").unwrap();
        std::fs::write(input.join("b2/x.jpg"), b"x").unwrap();
        std::fs::write(input.join("b2/.hidden"), b"x").unwrap();
        std::fs::write(input.join("loose.png"), b"x").unwrap();
        let folders = discover(&input).unwrap();
        let names: Vec<&str> = folders.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["scans", "a1", "b2"]);
        assert!(folders[1].files.is_empty());
        let files: Vec<String> = folders[2]
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(files, ["x.jpg", "y.jpg"]);
    }
}
