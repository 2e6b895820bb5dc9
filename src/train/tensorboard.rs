//! TensorBoard event files: what Keras's TensorBoard callback and torch's `SummaryWriter` write,
//! read by `tensorboard --logdir runs` (each run folder is one TensorBoard run).
//!
//! A file is a sequence of TFRecords (length, masked CRC-32C of the length, an `Event` protobuf
//! message, masked CRC-32C of the message). The few `Event`/`Summary` fields used are encoded here
//! by hand, with the field numbers of TensorBoard's `tensorboard/compat/proto/event.proto`,
//! `summary.proto`, `tensor.proto` and `plugins/hparams/{plugin_data,api}.proto`.
//!
//! # Tags (one table, [`TRAIN_LOSS`] to [`val_ap`], read by the training loop and the tests)
//!
//! | tag                | written        | step                                              |
//! |--------------------|----------------|---------------------------------------------------|
//! | `train/loss`       | every step     | global optimizer step (updates done, from 1)      |
//! | `train/lr`         | every step     | global optimizer step                             |
//! | `val/loss`         | every epoch    | epoch number (from 1, as `results.csv`'s `epoch`) |
//! | `val/micro_f1`     | every epoch    | epoch number                                      |
//! | `val/macro_f1`     | every epoch    | epoch number                                      |
//! | `val/map`          | every epoch    | epoch number                                      |
//! | `val/f1/<label>`   | every epoch    | epoch number                                      |
//! | `val/ap/<label>`   | every epoch    | epoch number                                      |
//!
//! Per-step tags count optimizer steps and per-epoch tags count epochs, as Keras's `batch_*` and
//! `epoch_*` tags do; the `train/` and `val/` prefixes keep the two axes in separate chart groups.
//! The hyper-parameters ([`EventWriter::hparams`]) go to TensorBoard's HPARAMS tab, with
//! [`EPOCH_METRICS`] as its metric columns.
//!
//! # Resume
//!
//! A resumed run opens [`EventWriter::resume`] in the same folder: a new file (named to sort after
//! the old ones, as TensorBoard reads a run's files in name order) that starts with a
//! `SessionLog.START` at the first global step it will write. TensorBoard then drops what the
//! interrupted run wrote at that step or later (the part of an epoch that is trained again), as it
//! does for a restarted TensorFlow job; per-epoch records of checkpointed epochs stay, since an
//! epoch number is always below the global step it ends at.
//!
//! Writes are buffered: the caller flushes once an epoch ([`EventWriter::flush`]); dropping the
//! writer flushes too (ignoring errors then).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};

/// Training loss of one optimizer step (step: global optimizer step).
pub const TRAIN_LOSS: &str = "train/loss";
/// Learning rate of one optimizer step (step: global optimizer step).
pub const TRAIN_LR: &str = "train/lr";
/// Validation loss of one epoch (step: epoch).
pub const VAL_LOSS: &str = "val/loss";
/// Validation micro-averaged F1 of one epoch (step: epoch).
pub const VAL_MICRO_F1: &str = "val/micro_f1";
/// Validation macro-averaged F1 of one epoch (step: epoch).
pub const VAL_MACRO_F1: &str = "val/macro_f1";
/// Validation mean average precision of one epoch (step: epoch).
pub const VAL_MAP: &str = "val/map";
/// The per-epoch tags the HPARAMS tab shows for each run.
pub const EPOCH_METRICS: [&str; 4] = [VAL_LOSS, VAL_MICRO_F1, VAL_MACRO_F1, VAL_MAP];

/// Validation F1 of one label (step: epoch).
pub fn val_f1(label: &str) -> String {
    format!("val/f1/{label}")
}

/// Validation average precision of one label (step: epoch).
pub fn val_ap(label: &str) -> String {
    format!("val/ap/{label}")
}

/// One hyper-parameter's value, as the HPARAMS tab types them.
#[derive(Debug, Clone, PartialEq)]
pub enum HParam {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl From<f64> for HParam {
    fn from(v: f64) -> Self {
        HParam::Number(v)
    }
}

impl From<usize> for HParam {
    fn from(v: usize) -> Self {
        HParam::Number(v as f64)
    }
}

impl From<bool> for HParam {
    fn from(v: bool) -> Self {
        HParam::Bool(v)
    }
}

impl From<&str> for HParam {
    fn from(v: &str) -> Self {
        HParam::Text(v.to_string())
    }
}

impl From<String> for HParam {
    fn from(v: String) -> Self {
        HParam::Text(v)
    }
}

/// Writes one event file of a run folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (which must exist) for a new run.
    pub fn create(dir: &Path) -> Result<Self> {
        Self::start(dir, 0)
    }

    /// Creates a new event file in `dir` for a resumed run whose first record has global step
    /// `first_step`: TensorBoard drops the earlier files' records at that step or later.
    pub fn resume(dir: &Path, first_step: i64) -> Result<Self> {
        Self::start(dir, first_step)
    }

    /// The file version record, then the session start at `step`.
    fn start(dir: &Path, step: i64) -> Result<Self> {
        let (path, file) = create_file(dir)?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.write(event(0).bytes(3, b"brain.Event:2"))?;
        // SessionLog { status: START }
        w.write(event(step).msg(7, Proto::default().uint(1, 1)))?;
        Ok(w)
    }

    /// The file this writer writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar, stored as a 32-bit float (`simple_value`, as Keras and torch store them).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        self.scalars(step, [(tag, value)])
    }

    /// Several scalars of one step, in one event.
    pub fn scalars<S: AsRef<str>>(
        &mut self,
        step: i64,
        values: impl IntoIterator<Item = (S, f64)>,
    ) -> Result<()> {
        let mut summary = Proto::default();
        for (tag, value) in values {
            let v = Proto::default()
                .bytes(1, tag.as_ref().as_bytes())
                .float(2, value as f32);
            summary = summary.msg(1, v);
        }
        self.write(event(step).msg(5, summary))
    }

    /// The run's hyper-parameters for the HPARAMS tab (its `session_start_info`, as torch's
    /// `add_hparams` and TensorBoard's `hparams` API write it). With `metrics`, also the
    /// experiment: its hyper-parameter and metric columns (TensorBoard shows the last value of
    /// each metric tag); without, TensorBoard makes the columns from every run and scalar tag.
    pub fn hparams(&mut self, hparams: &[(&str, HParam)], metrics: &[&str]) -> Result<()> {
        let now = wall_time();
        let mut start = Proto::default();
        for (name, value) in hparams {
            let entry = Proto::default()
                .bytes(1, name.as_bytes())
                .msg(2, protobuf_value(value));
            start = start.msg(1, entry);
        }
        let start = start.double(5, now);
        let mut summaries = vec![(
            "_hparams_/session_start_info",
            Proto::default().msg(3, start),
        )];
        if !metrics.is_empty() {
            summaries.insert(
                0,
                ("_hparams_/experiment", experiment(hparams, metrics, now)),
            );
        }
        for (tag, plugin_data) in summaries {
            // SummaryMetadata { plugin_data: { plugin_name: "hparams", content } }
            let plugin = Proto::default()
                .bytes(1, b"hparams")
                .bytes(2, &plugin_data.0);
            let value = Proto::default()
                .bytes(1, tag.as_bytes())
                .msg(9, Proto::default().msg(1, plugin))
                .msg(8, null_tensor());
            self.write(event(0).msg(5, Proto::default().msg(1, value)))?;
        }
        Ok(())
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("cannot write TensorBoard file {}", self.path.display()))
    }

    fn write(&mut self, event: Proto) -> Result<()> {
        self.out
            .write_all(&record(&event.0))
            .with_context(|| format!("cannot write TensorBoard file {}", self.path.display()))
    }
}

/// An `Event` with its wall time and step.
fn event(step: i64) -> Proto {
    Proto::default().double(1, wall_time()).uint(2, step as u64)
}

/// HParamsPluginData { experiment: { time_created_secs, hparam_infos, metric_infos } }.
fn experiment(hparams: &[(&str, HParam)], metrics: &[&str], now: f64) -> Proto {
    let mut exp = Proto::default().double(3, now);
    for (name, value) in hparams {
        // DataType: DATA_TYPE_STRING 1, DATA_TYPE_BOOL 2, DATA_TYPE_FLOAT64 3.
        let kind = match value {
            HParam::Text(_) => 1,
            HParam::Bool(_) => 2,
            HParam::Number(_) => 3,
        };
        exp = exp.msg(4, Proto::default().bytes(1, name.as_bytes()).uint(4, kind));
    }
    for tag in metrics {
        // MetricInfo { name: MetricName { group: "", tag } }
        let name = Proto::default().bytes(2, tag.as_bytes());
        exp = exp.msg(5, Proto::default().msg(1, name));
    }
    Proto::default().msg(2, exp)
}

/// google.protobuf.Value: number_value 2, string_value 3, bool_value 4.
fn protobuf_value(value: &HParam) -> Proto {
    match value {
        HParam::Number(v) => Proto::default().double(2, *v),
        HParam::Text(s) => Proto::default().bytes(3, s.as_bytes()),
        HParam::Bool(b) => Proto::default().uint(4, u64::from(*b)),
    }
}

/// The empty float tensor TensorBoard's own hparams summaries carry (dtype DT_FLOAT, shape [0]).
fn null_tensor() -> Proto {
    Proto::default()
        .uint(1, 1)
        .msg(2, Proto::default().msg(2, Proto::default()))
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One serialized protobuf message, built field by field.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u64, wire_type: u64) {
        self.varint((field << 3) | wire_type);
    }

    fn uint(mut self, field: u64, v: u64) -> Self {
        self.key(field, 0);
        self.varint(v);
        self
    }

    fn double(mut self, field: u64, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn float(mut self, field: u64, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(mut self, field: u64, b: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn msg(self, field: u64, m: Proto) -> Self {
        self.bytes(field, &m.0)
    }
}

/// One TFRecord: length (u64 LE), its masked CRC-32C, the data, its masked CRC-32C.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    r
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one byte at a time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Distinguishes the files one process creates (the name's last part, as TensorFlow's).
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

const PREFIX: &str = "events.out.tfevents.";

/// Creates `events.out.tfevents.<secs>.<host>.<pid>.<n>` in `dir`, never opening an existing
/// file (or following a link there): on a clash, the next `n`.
fn create_file(dir: &Path) -> Result<(PathBuf, File)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = file_secs(dir, now)?;
    let (host, pid) = (hostname(), std::process::id());
    for _ in 0..1000 {
        let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{PREFIX}{secs}.{host}.{pid}.{n}"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create TensorBoard file {}", path.display()))
            }
        }
    }
    bail!(
        "cannot create a TensorBoard file in {}: every name tried exists",
        dir.display()
    )
}

/// The seconds for a new file's name: now, or one more than the newest file already in `dir` if
/// that one is not older, so a resumed run's file sorts after the files it continues.
fn file_secs(dir: &Path, now: u64) -> Result<u64> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the run folder {}", dir.display()))?;
    let mut secs = now;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if let Some(Ok(s)) = rest.split('.').next().map(str::parse::<u64>) {
            if s >= secs {
                secs = s.saturating_add(1);
            }
        }
    }
    Ok(secs)
}

/// This machine's name, reduced to characters safe in a file name.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = buf[..len]
        .iter()
        .map(|&b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => b as char,
            _ => '_',
        })
        .collect();
    match (rc, name.is_empty()) {
        (0, false) => name,
        _ => "localhost".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc32c_matches_tensorflows() {
        // The CRC-32C check value, and TensorBoard's own masked_crc32c of the same bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        assert_eq!(masked_crc32c(&9u64.to_le_bytes()), 0x3971_F937);
    }

    #[test]
    fn negative_steps_are_ten_byte_varints() {
        let p = Proto::default().uint(2, -1i64 as u64);
        assert_eq!(p.0.len(), 11);
        assert_eq!(p.0[0], 0x10);
        assert_eq!(p.0[10], 0x01);
    }

    #[test]
    fn a_resumed_file_sorts_after_one_from_the_same_second() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::resume(dir.path(), 5).unwrap();
        assert!(a.path().file_name() < b.path().file_name());
        assert_ne!(a.path(), b.path());
    }
}
