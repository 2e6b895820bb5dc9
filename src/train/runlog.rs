//! The run logs: what a run reports while it trains. Each log implements [`RunLog`] and gets
//! every optimizer step and every finished epoch's [`EpochRecord`]; the loop knows only the
//! trait. Rank 0 alone logs in a job of several ranks. A new log is one more implementation,
//! added to the list [`RunLogs::for_run`] builds.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::run_dir::{self, RESULTS};
use super::settings::FitSettings;
use super::tensorboard::{self, EventWriter, HParam};
use crate::history::{EpochRecord, ValidationRecord};

/// What a run reports. Errors stop the run (the epoch is checkpointed by then).
pub trait RunLog {
    /// Before the first epoch of this session: the epochs a resumed run has already done.
    fn begin(&mut self, _history: &[EpochRecord]) -> Result<()> {
        Ok(())
    }

    /// After optimizer step `step` (the global count, from 1): its training loss (this rank's
    /// images) and learning rate.
    fn step(&mut self, _step: u64, _loss: f64, _lr: f64) -> Result<()> {
        Ok(())
    }

    /// After an epoch is validated and checkpointed: the history up to it (the last record is
    /// the epoch's) and whether it is the best so far.
    fn epoch(&mut self, history: &[EpochRecord], best: bool) -> Result<()>;
}

/// Every log of a run, called in turn.
#[derive(Default)]
pub struct RunLogs(Vec<Box<dyn RunLog>>);

impl RunLogs {
    /// The logs of a run in `run_dir` (rank 0): results.csv with results.png, the terminal's
    /// table, and TensorBoard unless turned off. `start_step` is the global step a resumed run
    /// continues from (0 for a new one).
    pub fn for_run(
        settings: &FitSettings,
        run_dir: &Path,
        labels: &[String],
        start_step: u64,
    ) -> Result<Self> {
        let mut logs: Vec<Box<dyn RunLog>> = vec![
            Box::new(CsvLog {
                csv: run_dir.join(RESULTS),
                png: run_dir.join("results.png"),
                labels: labels.to_vec(),
            }),
            Box::new(TerminalLog {
                epochs: settings.epochs,
                labels: labels.to_vec(),
            }),
        ];
        if settings.tensorboard {
            let log = TensorBoardLog::open(settings, run_dir, labels, start_step)?;
            logs.push(Box::new(log));
        }
        Ok(RunLogs(logs))
    }
}

impl RunLog for RunLogs {
    fn begin(&mut self, history: &[EpochRecord]) -> Result<()> {
        self.0.iter_mut().try_for_each(|l| l.begin(history))
    }

    fn step(&mut self, step: u64, loss: f64, lr: f64) -> Result<()> {
        self.0.iter_mut().try_for_each(|l| l.step(step, loss, lr))
    }

    fn epoch(&mut self, history: &[EpochRecord], best: bool) -> Result<()> {
        self.0.iter_mut().try_for_each(|l| l.epoch(history, best))
    }
}

/// `results.csv` (rebuilt whole, so it holds one row per checkpointed epoch) and its picture.
struct CsvLog {
    csv: PathBuf,
    png: PathBuf,
    labels: Vec<String>,
}

impl RunLog for CsvLog {
    fn begin(&mut self, history: &[EpochRecord]) -> Result<()> {
        run_dir::write_results(&self.csv, &self.labels, history)
    }

    fn epoch(&mut self, history: &[EpochRecord], _best: bool) -> Result<()> {
        run_dir::write_results(&self.csv, &self.labels, history)?;
        if let Err(e) = draw_results(&self.png, &self.labels, history) {
            crate::errln!("warning: cannot draw results.png: {e:#}");
        }
        Ok(())
    }
}

/// `results.png`: losses, micro/macro F1 and per-label F1 over epochs, at the precision
/// results.csv shows them (so the picture is that of the file).
pub fn draw_results(png: &Path, labels: &[String], history: &[EpochRecord]) -> Result<()> {
    let shown = |v: f64| format!("{v:.6}").parse::<f64>().ok();
    let series = |title: &str, value: &dyn Fn(&EpochRecord) -> Option<f64>| {
        let points = history
            .iter()
            .filter_map(|r| Some((r.epoch as f64, shown(value(r)?)?)))
            .collect();
        (title.to_string(), points)
    };
    fn val(r: &EpochRecord) -> Option<&ValidationRecord> {
        r.validation.as_ref()
    }
    let losses = vec![
        series("train", &|r| Some(r.train_loss)),
        series("validation", &|r| Some(val(r)?.loss)),
    ];
    let f1 = vec![
        series("micro-F1", &|r| Some(val(r)?.micro_f1)),
        series("macro-F1", &|r| val(r)?.macro_f1),
    ];
    let per_label: Vec<_> = (0..labels.len())
        .map(|l| series(&labels[l], &|r| Some(val(r)?.labels.get(l)?.f1)))
        .collect();
    crate::plots::training_curves(png, &losses, &f1, &per_label)
}

/// The terminal's lines of each epoch: losses, F1 and a per-label table.
struct TerminalLog {
    epochs: usize,
    labels: Vec<String>,
}

impl RunLog for TerminalLog {
    fn epoch(&mut self, history: &[EpochRecord], best: bool) -> Result<()> {
        let Some(r) = history.last() else {
            return Ok(());
        };
        let mut line = format!(
            "epoch {}/{}  train_loss {:.4}",
            r.epoch, self.epochs, r.train_loss
        );
        if let Some(v) = &r.validation {
            line += &format!(
                "  val_loss {:.4}{}  micro-F1 {:.3}  macro-F1 {}",
                v.loss,
                if best { " (best)" } else { "" },
                v.micro_f1,
                v.macro_f1
                    .map(|m| format!("{m:.3}"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        line += &format!(
            "  {:.1} s, {:.1} images/s",
            r.epoch_time_s, r.train_images_per_s
        );
        crate::errln!("{line}");
        if let Some(v) = &r.validation {
            let width = self
                .labels
                .iter()
                .map(|l| l.len())
                .max()
                .unwrap_or(5)
                .max(5);
            crate::errln!("  {:width$}  precision  recall     f1  support", "label");
            for (l, c) in self.labels.iter().zip(&v.labels) {
                crate::errln!(
                    "  {l:width$}  {:>9.3}  {:>6.3}  {:>5.3}  {:>7}",
                    c.precision,
                    c.recall,
                    c.f1,
                    c.support
                );
            }
        }
        Ok(())
    }
}

/// TensorBoard event files in the run folder: per step the training loss and learning rate, per
/// epoch the validation loss, micro/macro F1, mAP and each label's F1 and AP, and the run's
/// hyper-parameters (see [`tensorboard`] for the tags).
struct TensorBoardLog {
    writer: EventWriter,
    labels: Vec<String>,
    hparams: Vec<(&'static str, HParam)>,
}

impl TensorBoardLog {
    fn open(
        settings: &FitSettings,
        run_dir: &Path,
        labels: &[String],
        start_step: u64,
    ) -> Result<Self> {
        let writer = match start_step {
            0 => EventWriter::create(run_dir)?,
            n => EventWriter::resume(run_dir, n as i64 + 1)?,
        };
        Ok(TensorBoardLog {
            writer,
            labels: labels.to_vec(),
            hparams: hparams(settings),
        })
    }
}

/// The hyper-parameters TensorBoard shows.
fn hparams(s: &FitSettings) -> Vec<(&'static str, HParam)> {
    let recipe = &s.recipe;
    vec![
        ("arch", s.arch.name().into()),
        ("image_size", s.image_size.into()),
        ("batch_size", s.batch_size.into()),
        ("lr", s.lr.into()),
        ("epochs", s.epochs.into()),
        ("augment", format!("{:?}", s.augment).to_lowercase().into()),
        ("loss", s.loss.to_string().into()),
        ("best_by", s.best_by.column().into()),
        ("seed", (s.seed as f64).into()),
        ("val_fraction", s.val_fraction.into()),
        ("drop_connect", s.drop_connect.into()),
        (
            "precision",
            format!("{:?}", s.precision).to_lowercase().into(),
        ),
        ("accumulate", s.accumulate.into()),
        (
            "recipe",
            serde_json::to_string(recipe).unwrap_or_default().into(),
        ),
    ]
}

impl RunLog for TensorBoardLog {
    fn begin(&mut self, _history: &[EpochRecord]) -> Result<()> {
        self.writer
            .hparams(&self.hparams, &tensorboard::EPOCH_METRICS)?;
        self.writer.flush()
    }

    fn step(&mut self, step: u64, loss: f64, lr: f64) -> Result<()> {
        let values = [(tensorboard::TRAIN_LOSS, loss), (tensorboard::TRAIN_LR, lr)];
        self.writer.scalars(step as i64, values)
    }

    fn epoch(&mut self, history: &[EpochRecord], _best: bool) -> Result<()> {
        let Some(r) = history.last() else {
            return Ok(());
        };
        let mut values: Vec<(String, f64)> = Vec::new();
        if let Some(v) = &r.validation {
            values.push((tensorboard::VAL_LOSS.into(), v.loss));
            values.push((tensorboard::VAL_MICRO_F1.into(), v.micro_f1));
            values.extend(v.macro_f1.map(|m| (tensorboard::VAL_MACRO_F1.into(), m)));
            values.extend(v.map.map(|m| (tensorboard::VAL_MAP.into(), m)));
            for (label, c) in self.labels.iter().zip(&v.labels) {
                values.push((tensorboard::val_f1(label), c.f1));
                values.extend(c.ap.map(|ap| (tensorboard::val_ap(label), ap)));
            }
        }
        self.writer.scalars(r.epoch as i64, values)?;
        self.writer.flush()
    }
}
