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

/// One output file: the images of one input folder. Its files are listed only when it is tagged,
/// so memory does not grow with the number of folders' images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folder {
    /// The JSON file's name without `.json`: the subfolder's name (the book's PID).
    pub name: String,
    /// Where its images are: a subfolder of the input, or the input itself for the loose images.
    pub dir: PathBuf,
    /// How many files it held when counted (for the progress bar): the loose images when
    /// discovered, a subfolder's by [`count_files`] (only for the folders still to tag).
    pub count: usize,
}

impl Folder {
    /// Its files, sorted by name: every entry but folders (a broken link or a pipe is then
    /// reported by path when it is read).
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        Ok(sorted_entries(&self.dir)?
            .into_iter()
            .filter(|p| !p.is_dir())
            .collect())
    }
}

/// Settings of one `infer` run.
#[derive(Clone, Debug)]
pub struct InferOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// One threshold for every label; `None` uses the model's own.
    pub threshold: Option<f32>,
    pub batch_size: usize,
    /// Tag folders whose JSON file already exists too (otherwise they are left as they are).
    pub overwrite: bool,
}

/// What an `infer` run did.
#[derive(Debug, Default)]
pub struct InferSummary {
    pub folders_written: usize,
    /// Folders left out because their JSON file already exists (without `--overwrite`).
    pub folders_done_before: usize,
    pub images_tagged: usize,
    /// Files that could not be used, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    pub seconds: f64,
    /// Of `seconds`, the time the model waited for decoded images (decoding is the bottleneck
    /// when it is most of it).
    pub waiting_seconds: f64,
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
    let mut loose = 0;
    for entry in sorted_entries(input)? {
        if entry.is_dir() {
            let name = entry
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            folders.push(Folder {
                name,
                dir: entry,
                count: 0,
            });
        } else {
            loose += 1;
        }
    }
    if loose > 0 {
        let canonical = input.canonicalize().unwrap_or_else(|_| input.to_path_buf());
        let name = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "images".into());
        let dir = input.to_path_buf();
        folders.insert(
            0,
            Folder {
                name,
                dir,
                count: loose,
            },
        );
    }
    check_distinct_names(input, &folders)?;
    Ok(folders)
}

/// Counts the files of the subfolders (the progress bar's total). A folder that cannot be read
/// counts 0 here and is reported when its images are listed.
pub fn count_files(folders: &mut [Folder], input: &Path) {
    for f in folders.iter_mut().filter(|f| f.dir != input) {
        f.count = f.files().map_or(0, |v| v.len());
    }
}

/// Two folders must never write the same JSON file: the loose images of `input` and a subfolder
/// named like `input`, or two folder names that are the same once made printable.
fn check_distinct_names(input: &Path, folders: &[Folder]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, folder) in folders.iter().enumerate() {
        if let Some(first) = seen.insert(folder.name.as_str(), i) {
            let loose = first == 0 && folders[0].dir == input;
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

/// What the decoding thread hands to the model, in folder order.
enum Item {
    /// An image of folder `folder` (an index into the folders being tagged), decoded or not.
    Image {
        folder: usize,
        path: PathBuf,
        pixels: Result<Vec<u8>, String>,
    },
    /// Every image of folder `folder` came before this.
    End { folder: usize },
    /// The folder could not be listed.
    Failed { folder: usize, reason: String },
}

/// True when `output/<name>.json` exists and is a whole JSON object (files are written atomically,
/// so one that parses is one a finished run wrote).
fn already_tagged(output: &Path, folder: &Folder) -> bool {
    let path = output.join(format!("{}.json", folder.name));
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v.is_object())
}

/// Lists and decodes the folders' images on all cores, `batch` images at a time, ahead of the
/// model (two batches at most wait in the channel, so memory is bounded by the batch).
fn decode_folders(
    folders: Vec<Folder>,
    size: usize,
    batch: usize,
    tx: mpsc::SyncSender<Vec<Item>>,
) {
    let send = |mut items: Vec<Item>| {
        items.par_iter_mut().for_each(|item| {
            if let Item::Image { path, pixels, .. } = item {
                *pixels = load_resized(path, size).map_err(|e| e.to_string());
            }
        });
        tx.send(items).is_ok()
    };
    let mut pending = Vec::new();
    let mut images = 0;
    for (index, folder) in folders.iter().enumerate() {
        if progress::interrupted() {
            return;
        }
        let files = match folder.files() {
            Ok(f) => f,
            Err(e) => {
                pending.push(Item::Failed {
                    folder: index,
                    reason: format!("{e:#}"),
                });
                continue;
            }
        };
        for path in files {
            pending.push(Item::Image {
                folder: index,
                path,
                pixels: Err(String::new()),
            });
            images += 1;
            if images == batch {
                if !send(std::mem::take(&mut pending)) || progress::interrupted() {
                    return;
                }
                images = 0;
            }
        }
        pending.push(Item::End { folder: index });
    }
    if !pending.is_empty() {
        send(pending);
    }
}

/// Tags every folder under `opts.input` and writes `opts.output/<name>.json` for each. Folders
/// whose JSON file already exists are left out unless `opts.overwrite`, so a stopped run is
/// continued by running it again.
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
    // What a killed run left half-written (a running one's temporaries stay: they are locked).
    crate::fsutil::remove_stale_temporaries(&opts.output, std::time::Duration::ZERO);
    let mut summary = InferSummary::default();
    let (mut todo, done): (Vec<Folder>, Vec<Folder>) = folders
        .into_iter()
        .partition(|f| opts.overwrite || !already_tagged(&opts.output, f));
    // Only the folders still to tag are read for the count: a restart of a library-scale run
    // lists no finished folder.
    count_files(&mut todo, &opts.input);
    summary.folders_done_before = done.len();
    let total: usize = todo.iter().map(|f| f.count).sum();
    let bar = progress::bar(total as u64, "images");
    bar.set_prefix("infer");

    let (tx, rx) = mpsc::sync_channel::<Vec<Item>>(2);
    let (size, batch) = (model.image_size, opts.batch_size.max(1));
    let folders = todo.clone();
    let producer = std::thread::spawn(move || decode_folders(folders, size, batch, tx));
    let mut writer = TagWriter::new(model, opts);
    let mut result = Ok(());
    let mut waited = Instant::now();
    for items in rx {
        summary.waiting_seconds += waited.elapsed().as_secs_f64();
        if progress::interrupted() {
            break;
        }
        result = writer.tag(items, &todo, &mut summary, &bar);
        if result.is_err() {
            break;
        }
        waited = Instant::now();
    }
    summary.interrupted = progress::interrupted();
    drop(writer);
    if producer.join().is_err() {
        bail!("the decoding thread failed");
    }
    result?;
    bar.finish_and_clear();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The model side of `run`: tags each decoded batch (the network is `model::efficientnet::Tagger`)
/// and writes a folder's JSON file when its last image is done. Only the folders in progress are held in memory.
struct TagWriter<'a> {
    model: &'a LoadedModel,
    opts: &'a InferOptions,
    thresholds: Vec<f32>,
    open: std::collections::HashMap<usize, Map<String, Value>>,
}

impl<'a> TagWriter<'a> {
    fn new(model: &'a LoadedModel, opts: &'a InferOptions) -> Self {
        let thresholds = match opts.threshold {
            Some(t) => vec![t; model.taxonomy.labels.len()],
            None => model.thresholds.clone(),
        };
        TagWriter {
            model,
            opts,
            thresholds,
            open: Default::default(),
        }
    }

    fn tag(
        &mut self,
        items: Vec<Item>,
        folders: &[Folder],
        summary: &mut InferSummary,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let size = self.model.image_size;
        let mut pixels = Vec::new();
        let mut ok = Vec::new();
        for item in &items {
            if let Item::Image {
                folder,
                path,
                pixels: p,
            } = item
            {
                match p {
                    Ok(p) => {
                        pixels.extend_from_slice(p);
                        ok.push((*folder, path));
                    }
                    Err(reason) => {
                        bar.suspend(|| crate::errln!("skipped {reason}"));
                        summary.skipped.push((path.clone(), reason.clone()));
                    }
                }
                bar.inc(1);
            }
        }
        debug_assert_eq!(pixels.len(), ok.len() * size * size * 3);
        let probs = if ok.is_empty() {
            Vec::new()
        } else {
            self.model.predict(&pixels, ok.len())?
        };
        let labels = &self.model.taxonomy.labels;
        for (k, (folder, path)) in ok.into_iter().enumerate() {
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let value = tags(
                &probs[k * labels.len()..(k + 1) * labels.len()],
                labels,
                &self.thresholds,
            );
            if self
                .open
                .entry(folder)
                .or_default()
                .insert(stem.clone(), value)
                .is_some()
            {
                bar.suspend(|| crate::errln!("warning: {}: another file in this folder has the stem '{stem}'; the last one is kept", path.display()));
            }
            summary.images_tagged += 1;
        }
        for item in items {
            match item {
                Item::End { folder } => {
                    let result = self.open.remove(&folder).unwrap_or_default();
                    write_folder(&self.opts.output, &folders[folder], &result)?;
                    summary.folders_written += 1;
                }
                Item::Failed { folder, reason } => {
                    let dir = &folders[folder].dir;
                    bar.suspend(|| crate::errln!("skipped folder {}: {reason}", dir.display()));
                    summary.skipped.push((dir.clone(), reason));
                }
                Item::Image { .. } => {}
            }
        }
        Ok(())
    }
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
        let mut folders = discover(&input).unwrap();
        assert_eq!(folders[2].count, 0, "not counted while discovering");
        count_files(&mut folders, &input);
        let names: Vec<&str> = folders.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["scans", "a1", "b2"]);
        assert_eq!(folders[1].count, 0);
        assert_eq!((folders[0].count, folders[2].count), (1, 2));
        let files: Vec<String> = folders[2]
            .files()
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(files, ["x.jpg", "y.jpg"]);
    }
}
