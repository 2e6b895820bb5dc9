//! The run folder `runs/<run>/`: its file names, the next free run name, its lock, `val.txt`
//! (written here, read back here on resume and by `eval --split` through [`crate::data::split`]),
//! `results.csv` and the clean-up of what a killed process left half-written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::settings::{FitSettings, Resume};
use crate::csvfile;
use crate::data::dataset;
use crate::data::split::{self, split_indices};
use crate::fsutil::write_atomic;
use crate::history::{self, EpochRecord};
use crate::model::checkpoint::Checkpoint;

pub use crate::data::split::VAL_LIST;
pub const RESULTS: &str = "results.csv";
pub const LAST: &str = "last.ckpt";
pub const BEST: &str = "best.ckpt";
pub const SETTINGS: &str = "settings.json";
/// Written when early stopping ends a run: the reason.
pub const STOPPED: &str = "stopped.txt";

/// The next free run folder: `runs/fit`, `runs/fit2`, ...
pub fn next_run_dir(runs: &Path) -> PathBuf {
    let first = runs.join("fit");
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|i| runs.join(format!("fit{i}")))
        .find(|p| !p.exists())
        .expect("a free name")
}

/// The run in `run_dir` to continue (`fit --resume`): its last checkpoint.
pub fn resume(run_dir: &Path) -> Result<Resume> {
    let checkpoint = Checkpoint::read(&run_dir.join(LAST))
        .with_context(|| format!("cannot resume {}", run_dir.display()))?;
    Ok(Resume {
        run_dir: run_dir.to_path_buf(),
        checkpoint,
    })
}

/// A new run may not start in a folder that already holds one.
pub fn refuse_existing_run(run_dir: &Path) -> Result<()> {
    if run_dir.join(LAST).exists() {
        bail!(
            "run folder {} already holds a run; resume it with --resume {} or choose another --run",
            run_dir.display(),
            run_dir.display()
        );
    }
    Ok(())
}

/// Creates (or opens, on resume) the run folder and locks it for this process; clears what a
/// killed process left half-written there. A new run refuses a folder that already holds one.
pub fn open_run_dir(run_dir: &Path, resume: bool) -> Result<crate::fsutil::DirLock> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run folder {}", run_dir.display()))?;
    let lock = crate::fsutil::lock_dir(run_dir, "trainer fit")?;
    if !resume {
        refuse_existing_run(run_dir)?;
    }
    let removed = crate::fsutil::remove_stale_temporaries(run_dir, std::time::Duration::ZERO);
    if removed > 0 {
        crate::errln!(
            "removed {removed} half-written temporary file(s) from {}",
            run_dir.display()
        );
    }
    Ok(lock)
}

/// The run folder (rank 0), created and locked only once everything given was usable, with
/// `val.txt` (the validation images `val_images` of `data`) and `settings.json` for a new run.
pub fn prepare(
    settings: &FitSettings,
    run_dir: &Path,
    resume: bool,
    val_images: &[&Path],
) -> Result<crate::fsutil::DirLock> {
    let lock = open_run_dir(run_dir, resume)?;
    if !resume {
        let listing: String = val_images
            .iter()
            .map(|p| split::val_list_entry(&settings.data, p) + "\n")
            .collect();
        write_atomic(&run_dir.join(VAL_LIST), listing.as_bytes())?;
        write_atomic(
            &run_dir.join(SETTINGS),
            serde_json::to_string_pretty(settings)?.as_bytes(),
        )?;
    }
    // What a killed writer left half-written (another job's live temporaries stay: locked).
    crate::fsutil::remove_stale_temporaries(&settings.weights_dir, std::time::Duration::ZERO);
    Ok(lock)
}

/// The training and validation indices, in index order: from the seed for a new run, from
/// `val.txt` on resume.
pub fn split(
    settings: &FitSettings,
    run_dir: &Path,
    resume: bool,
    cache: &dataset::ImageCache,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let n = cache.samples.len();
    let to_i64 = |v: Vec<usize>| v.into_iter().map(|i| i as i64).collect::<Vec<_>>();
    if !resume {
        let (mut train, mut val) = split_indices(n, settings.seed as u32, settings.val_fraction);
        // Index order, as a resumed run rebuilds them from val.txt.
        train.sort();
        val.sort();
        return Ok((to_i64(train), to_i64(val)));
    }
    let val_list = run_dir.join(VAL_LIST);
    let names = split::read_val_list(&val_list)?;
    let (val, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| {
        names.contains(split::val_list_entry(&settings.data, &cache.samples[i].path).as_str())
    });
    if val.len() != names.len() {
        crate::say!(
            "warning: {} of the {} validation images listed in {} are no longer in the dataset",
            names.len() - val.len(),
            names.len(),
            val_list.display()
        );
    }
    Ok((to_i64(train), to_i64(val)))
}

/// What a run stopped in `epoch` keeps, for its message.
pub fn kept_checkpoint(run_dir: &Path, epoch: usize) -> String {
    match epoch > 1 {
        true => format!(
            "{} (epoch {}) is kept",
            run_dir.join(LAST).display(),
            epoch - 1
        ),
        false => "no checkpoint had been written yet".to_string(),
    }
}

/// The records to keep on resume: the checkpoint's own history (every epoch up to it), or, for a
/// checkpoint written before histories were kept, the CSV's rows of the epochs up to it.
pub fn resumed_history(previous: &Checkpoint, csv_path: &Path) -> Vec<EpochRecord> {
    if !previous.meta.history.is_empty() {
        return previous.meta.history.clone();
    }
    let labels = previous.meta.taxonomy.labels.len();
    let text = std::fs::read_to_string(csv_path).unwrap_or_default();
    let records = csvfile::read_records(&text, &csv_path.display().to_string()).unwrap_or_default();
    records
        .iter()
        .skip(1)
        .filter_map(|r| EpochRecord::from_csv(r, labels).ok())
        .filter(|r| r.epoch <= previous.meta.epoch)
        .collect()
}

/// Writes `results.csv` whole (atomically): the header, then one row per checkpointed epoch.
pub fn write_results(path: &Path, labels: &[String], history: &[EpochRecord]) -> Result<()> {
    let mut text = history::csv_header(labels) + "\n";
    for record in history {
        text += &record.csv_row(labels.len());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}
