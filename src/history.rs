//! The record of one training epoch: what validation returns, what checkpoints store (the run's
//! history), what `results.csv` shows and what every run log receives. `results.csv`'s columns
//! are described here once: [`csv_header`] and [`EpochRecord::csv_row`], and read back by
//! [`EpochRecord::from_csv`] for checkpoints that stored rows.

use serde::{Deserialize, Serialize};

use crate::csvfile;
use crate::metrics::{self, Counts};

/// One label's validation results at the threshold 0.5.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
    /// Average precision (none in histories written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ap: Option<f64>,
}

/// An epoch's validation: the mean BCE and the metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub loss: f64,
    pub micro_f1: f64,
    pub macro_f1: Option<f64>,
    /// Mean of the labels' average precisions (over labels with positives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<f64>,
    pub labels: Vec<LabelRecord>,
}

impl ValidationRecord {
    /// The record of `loss` and of probabilities `probs` against `targets` (row-major, `n_labels`
    /// columns), counted at the threshold 0.5.
    pub fn new(loss: f64, probs: &[f32], targets: &[f32], n_labels: usize) -> Self {
        let counts = metrics::count(probs, targets, n_labels, &vec![0.5; n_labels]);
        let aps: Vec<Option<f64>> = (0..n_labels)
            .map(|l| {
                let (scores, truth) = metrics::label_column(probs, targets, l, n_labels);
                metrics::average_precision(&scores, &truth)
            })
            .collect();
        let map = metrics::mean(aps.iter().flatten().copied());
        ValidationRecord {
            loss,
            micro_f1: metrics::micro_f1(&counts),
            macro_f1: metrics::macro_f1(&counts),
            map,
            labels: counts.iter().zip(aps).map(label_record).collect(),
        }
    }
}

fn label_record((c, ap): (&Counts, Option<f64>)) -> LabelRecord {
    LabelRecord {
        precision: c.precision(),
        recall: c.recall(),
        f1: c.f1(),
        support: c.support(),
        ap,
    }
}

/// One epoch of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Mean training loss over the epoch's images (of the loss trained with).
    pub train_loss: f64,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    pub epoch_time_s: f64,
    pub train_images_per_s: f64,
    /// None without validation images.
    pub validation: Option<ValidationRecord>,
}

/// The columns before the per-label ones, and those of each label.
const COLUMNS: [&str; 8] = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_micro_f1",
    "val_macro_f1",
    "lr",
    "epoch_time_s",
    "train_images_per_s",
];
const LABEL_COLUMNS: [&str; 4] = ["precision", "recall", "f1", "support"];

/// The header of `results.csv`.
pub fn csv_header(labels: &[String]) -> String {
    let mut cols: Vec<String> = COLUMNS.map(String::from).to_vec();
    for l in labels {
        for m in LABEL_COLUMNS {
            cols.push(format!("{m}/{l}"));
        }
    }
    // Each column begins with its metric's name, so a label never starts a field.
    csvfile::record(cols)
}

/// The number of fields of a row for `n_labels` labels.
pub fn csv_fields(n_labels: usize) -> usize {
    COLUMNS.len() + LABEL_COLUMNS.len() * n_labels
}

impl EpochRecord {
    /// Its `results.csv` row (see [`csv_header`]); `n_labels` empty cells per label without
    /// validation.
    pub fn csv_row(&self, n_labels: usize) -> String {
        let v = self.validation.as_ref();
        let mut row = vec![
            self.epoch.to_string(),
            format!("{:.6}", self.train_loss),
            csvfile::opt(v.map(|v| v.loss)),
            csvfile::opt(v.map(|v| v.micro_f1)),
            csvfile::opt(v.and_then(|v| v.macro_f1)),
            format!("{}", self.lr),
            format!("{:.3}", self.epoch_time_s),
            format!("{:.2}", self.train_images_per_s),
        ];
        for l in 0..n_labels {
            match v.and_then(|v| v.labels.get(l)) {
                Some(c) => row.extend([
                    format!("{:.6}", c.precision),
                    format!("{:.6}", c.recall),
                    format!("{:.6}", c.f1),
                    c.support.to_string(),
                ]),
                None => row.extend(std::iter::repeat_n(String::new(), 4)),
            }
        }
        csvfile::record(row)
    }

    /// The record a `results.csv` row shows (histories of checkpoints before records were
    /// stored): the values at the row's precision, no average precisions.
    pub fn from_csv(row: &csv::StringRecord, n_labels: usize) -> Result<Self, String> {
        if row.len() != csv_fields(n_labels) {
            return Err(format!(
                "{} fields, not {}",
                row.len(),
                csv_fields(n_labels)
            ));
        }
        let number = |i: usize| -> Result<Option<f64>, String> {
            let f = row.get(i).unwrap_or("");
            match f.is_empty() {
                true => Ok(None),
                false => f
                    .parse::<f64>()
                    .map(Some)
                    .map_err(|_| format!("field {} ({f:?}) is not a number", i + 1)),
            }
        };
        let required = |i: usize| number(i)?.ok_or_else(|| format!("field {} is empty", i + 1));
        let validation = match number(2)? {
            None => None,
            Some(loss) => Some(ValidationRecord {
                loss,
                micro_f1: required(3)?,
                macro_f1: number(4)?,
                map: None,
                labels: (0..n_labels)
                    .map(|l| {
                        let at = COLUMNS.len() + LABEL_COLUMNS.len() * l;
                        Ok(LabelRecord {
                            precision: required(at)?,
                            recall: required(at + 1)?,
                            f1: required(at + 2)?,
                            support: required(at + 3)? as u64,
                            ap: None,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            }),
        };
        let epoch = required(0)?;
        if epoch.fract() != 0.0 || epoch < 0.0 {
            return Err(format!("epoch {epoch} is not a count"));
        }
        Ok(EpochRecord {
            epoch: epoch as usize,
            train_loss: required(1)?,
            lr: required(5)?,
            epoch_time_s: required(6)?,
            train_images_per_s: required(7)?,
            validation,
        })
    }

    /// The value of a metric `--best-by` may name (none without validation).
    pub fn metric(&self, by: BestBy) -> Option<f64> {
        let v = self.validation.as_ref()?;
        match by {
            BestBy::ValLoss => Some(v.loss),
            BestBy::MicroF1 => Some(v.micro_f1),
            BestBy::MacroF1 => v.macro_f1,
            BestBy::Map => v.map,
        }
    }
}

/// Which validation result makes an epoch the best one (`best.ckpt`, the Keras weights, what
/// `--patience` watches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum BestBy {
    /// The lowest validation loss (the original's).
    #[default]
    ValLoss,
    /// The highest micro-averaged F1.
    MicroF1,
    /// The highest macro-averaged F1.
    MacroF1,
    /// The highest mean average precision.
    Map,
}

impl BestBy {
    /// Whether `value` is better than `best`.
    pub fn better(self, value: f64, best: f64) -> bool {
        match self {
            BestBy::ValLoss => value < best,
            _ => value > best,
        }
    }

    pub fn is_default(&self) -> bool {
        *self == BestBy::ValLoss
    }

    /// What it is, in messages.
    pub fn describe(self) -> &'static str {
        match self {
            BestBy::ValLoss => "the validation loss",
            BestBy::MicroF1 => "the validation micro-F1",
            BestBy::MacroF1 => "the validation macro-F1",
            BestBy::Map => "the validation mAP",
        }
    }

    /// Its name in results.csv and messages.
    pub fn column(self) -> &'static str {
        match self {
            BestBy::ValLoss => "val_loss",
            BestBy::MicroF1 => "val_micro_f1",
            BestBy::MacroF1 => "val_macro_f1",
            BestBy::Map => "val_map",
        }
    }
}

/// A checkpoint's `history`: records, or (checkpoints written before records were stored)
/// `results.csv` rows, read into records.
pub fn deserialize_history<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<EpochRecord>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Record(EpochRecord),
        Row(String),
    }
    let entries = Vec::<Entry>::deserialize(d)?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| match e {
            Entry::Record(r) => Ok(r),
            Entry::Row(text) => {
                let records = csvfile::read_records(&text, "history").map_err(|e| e.to_string());
                let row = records
                    .ok()
                    .and_then(|r| r.into_iter().next())
                    .unwrap_or_default();
                // The row's own label count: checked against the taxonomy by the checkpoint.
                let labels = row.len().saturating_sub(COLUMNS.len()) / LABEL_COLUMNS.len();
                EpochRecord::from_csv(&row, labels)
            }
            .map_err(|e| format!("history row {}: {e}", i + 1)),
        })
        .collect::<Result<_, String>>()
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(validation: bool) -> EpochRecord {
        EpochRecord {
            epoch: 3,
            train_loss: 0.123_456_78,
            lr: 0.000_123_456_789,
            epoch_time_s: 12.345_6,
            train_images_per_s: 45.678,
            validation: validation.then(|| {
                ValidationRecord::new(
                    0.5,
                    &[0.9, 0.1, 0.6, 0.7, 0.2, 0.3],
                    &[1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                    2,
                )
            }),
        }
    }

    #[test]
    fn rows_read_back_into_records_that_write_the_same_rows() {
        for validation in [true, false] {
            let r = record(validation);
            let row = r.csv_row(2);
            let records = csvfile::read_records(&row, "row").unwrap();
            let back = EpochRecord::from_csv(&records[0], 2).unwrap();
            assert_eq!(back.csv_row(2), row);
            assert_eq!(back.validation.is_some(), validation);
        }
        let header = csv_header(&["a".into(), "b".into()]);
        assert_eq!(header.split(',').count(), csv_fields(2));
        assert_eq!(record(true).csv_row(2).split(',').count(), csv_fields(2));
    }

    #[test]
    fn validation_metrics_and_average_precision() {
        let v = record(true).validation.unwrap();
        // Label 0: scores 0.9, 0.6, 0.2 for truths 1, 1, 0: ranked perfectly.
        assert_eq!(v.labels[0].ap, Some(1.0));
        assert_eq!((v.labels[0].support, v.labels[1].support), (2, 1));
        // Label 1: scores 0.1, 0.7, 0.3 for truths 0, 1, 0: the positive ranks first.
        assert_eq!(v.labels[1].ap, Some(1.0));
        assert_eq!(v.map, Some(1.0));
        assert_eq!(v.labels[1].f1, 1.0);
    }

    #[test]
    fn best_by_direction() {
        assert!(BestBy::ValLoss.better(0.1, 0.2));
        assert!(!BestBy::ValLoss.better(0.2, 0.1));
        assert!(BestBy::MacroF1.better(0.8, 0.7));
        assert!(!BestBy::Map.better(0.7, 0.8));
        let r = record(true);
        assert_eq!(r.metric(BestBy::ValLoss), Some(0.5));
        assert_eq!(record(false).metric(BestBy::MicroF1), None);
    }

    #[test]
    fn histories_of_rows_and_of_records_both_read() {
        let r = record(true);
        let rows = serde_json::json!([r.csv_row(2)]);
        let from_rows: Vec<EpochRecord> = deserialize_history(rows).unwrap();
        assert_eq!(from_rows[0].csv_row(2), r.csv_row(2));
        let records = serde_json::to_value(vec![r.clone()]).unwrap();
        assert_eq!(deserialize_history(records).unwrap(), vec![r]);
        let bad = serde_json::json!(["1,x,,"]);
        let err = deserialize_history(bad).unwrap_err().to_string();
        assert!(err.contains("history row 1"), "{err}");
    }
}
