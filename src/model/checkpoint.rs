//! Our checkpoint files: one safetensors file holding the model's tensors (`model.<name>`), the
//! optimizer's moments (`adam.m.<name>`, `adam.v.<name>`) and, in its metadata, a JSON
//! description: labels, taxonomy, preprocessing, thresholds, epoch, random-number state and the
//! run's settings. A model can thus never be run with the wrong labels or preprocessing.

use std::collections::HashMap;
use std::path::Path;

use crate::history::EpochRecord;
use anyhow::{bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::arch::Arch;
use crate::data::preprocess;
use crate::data::taxonomy::Taxonomy;
use crate::fsutil::write_atomic;

pub const FORMAT: &str = "trainer-checkpoint";
/// Version 2 added the tensor checksum and the per-epoch history.
pub const VERSION: u32 = 2;
const META_KEY: &str = "trainer";
/// Smallest and largest input size a checkpoint may ask for.
pub const MIN_IMAGE_SIZE: usize = 32;
pub const MAX_IMAGE_SIZE: usize = 2048;
/// Largest checkpoint file read (an EfficientNet-B0 with its Adam state is about 50 MB).
const MAX_FILE_BYTES: u64 = 2 << 30;

/// How images are turned into model inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub image_size: usize,
    /// Always [`preprocess::CHANNEL_ORDER`] ("BGR"): channels as `cv2.imread` returns them.
    pub channel_order: String,
    /// Always [`preprocess::RESIZE`] ("opencv_inter_linear").
    pub resize: String,
    /// Pixel values are multiplied by this (1 / [`preprocess::DIVISOR`]).
    pub scale: f64,
}

impl Preprocessing {
    pub fn original(image_size: usize) -> Self {
        Preprocessing {
            image_size,
            channel_order: preprocess::CHANNEL_ORDER.into(),
            resize: preprocess::RESIZE.into(),
            scale: 1.0 / preprocess::DIVISOR,
        }
    }
}

/// Everything a checkpoint says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub version: u32,
    /// Epochs completed (1-based).
    pub epoch: usize,
    pub taxonomy: Taxonomy,
    pub preprocessing: Preprocessing,
    /// Per-label thresholds `infer` applies by default.
    pub thresholds: Vec<f32>,
    pub drop_connect: f64,
    /// Adam steps taken (0 when the file carries no optimizer state).
    pub optimizer_step: i64,
    /// The run's seed; epoch `e` draws its randomness from (seed, e), so this and `epoch` are the
    /// whole random-number state.
    pub seed: u64,
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    /// The `fit` settings of the run, as given.
    pub settings: serde_json::Value,
    /// The record of every epoch up to this one, so `results.csv` can always be rebuilt (rows of
    /// that file in checkpoints written before records were stored).
    #[serde(default, deserialize_with = "crate::history::deserialize_history")]
    pub history: Vec<EpochRecord>,
    /// The epoch of `best_val_loss` (early stopping counts from it).
    #[serde(default)]
    pub best_epoch: Option<usize>,
    /// SHA-256 of the tensors (names, shapes and bytes, in name order), filled in when written.
    #[serde(default)]
    pub tensors_sha256: Option<String>,
    /// The EfficientNet variant; absent for B0 (older checkpoints are all B0), so a B0
    /// checkpoint's bytes are those it always had.
    #[serde(
        default,
        skip_serializing_if = "Arch::is_b0",
        deserialize_with = "arch_field"
    )]
    pub arch: Arch,
}

/// `arch` through [`Arch`]'s parser, the error naming the field.
fn arch_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
    let name = String::deserialize(d)?;
    name.parse()
        .map_err(|e| serde::de::Error::custom(format!("field arch: {e}")))
}

impl CheckpointMeta {
    /// Checks every field against sane ranges and the others; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let labels = &self.taxonomy.labels;
        // The label rules of a taxonomy file: a checkpoint `fit` wrote is always readable.
        self.taxonomy
            .validate()
            .map_err(|e| format!("taxonomy.{e}"))?;
        if self.thresholds.len() != labels.len() {
            return Err(format!(
                "thresholds has {} values for {} labels",
                self.thresholds.len(),
                labels.len()
            ));
        }
        if let Some(t) = self.thresholds.iter().find(|t| !(0.0..=1.0).contains(*t)) {
            return Err(format!("thresholds holds {t}, outside [0, 1]"));
        }
        self.preprocessing.validate()?;
        if !(0.0..1.0).contains(&self.drop_connect) {
            return Err(format!(
                "drop_connect is {}, outside [0, 1)",
                self.drop_connect
            ));
        }
        if self.optimizer_step < 0 {
            return Err(format!("optimizer_step is {}", self.optimizer_step));
        }
        if let Some(b) = self.best_epoch.filter(|&b| b > self.epoch) {
            return Err(format!("best_epoch {b} is after epoch {}", self.epoch));
        }
        self.validate_history()
    }

    /// Every `history` record is of an epoch up to this one, with one result per label.
    fn validate_history(&self) -> Result<(), String> {
        let labels = self.taxonomy.labels.len();
        for (i, r) in self.history.iter().enumerate() {
            let per_label = r.validation.as_ref().map_or(labels, |v| v.labels.len());
            if per_label != labels || r.epoch > self.epoch {
                return Err(format!(
                    "history row {} is not a results.csv row of this run's {labels} labels up to epoch {}",
                    i + 1,
                    self.epoch
                ));
            }
        }
        Ok(())
    }
}

impl Preprocessing {
    /// The only preprocessing the model knows (`data::preprocess`), at a sane size.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(format!(
                "preprocessing.image_size is {}, outside [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]",
                self.image_size
            ));
        }
        let expected = Preprocessing::original(self.image_size);
        if self.channel_order != expected.channel_order {
            return Err(format!(
                "preprocessing.channel_order is '{}'; only '{}' is supported",
                self.channel_order, expected.channel_order
            ));
        }
        if self.resize != expected.resize {
            return Err(format!(
                "preprocessing.resize is '{}'; only '{}' is supported",
                self.resize, expected.resize
            ));
        }
        if (self.scale - expected.scale).abs() > 1e-9 {
            return Err(format!(
                "preprocessing.scale is {}; only 1/{} is supported",
                self.scale,
                preprocess::DIVISOR
            ));
        }
        Ok(())
    }
}

/// SHA-256 over each tensor's name, shape and little-endian bytes, in name order.
fn tensors_sha256<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> String {
    use sha2::Digest;
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = sha2::Sha256::new();
    for (name, shape, bytes) in sorted {
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            hasher.update((*d as u64).to_le_bytes());
        }
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every tensor as (shape, little-endian f32 bytes), with one device-to-host copy for all of them
/// (a GPU run's checkpoint is ~750 tensors).
fn to_bytes(tensors: &[&Tensor]) -> Result<Vec<(Vec<usize>, Vec<u8>)>> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.detach().to_kind(Kind::Float).contiguous().flatten(0, -1))
        .collect();
    let all = Tensor::cat(&flat, 0).to_device(Device::Cpu);
    let values = Vec::<f32>::try_from(&all)?;
    let mut out = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        let n = t.numel();
        let bytes = values[offset..offset + n]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        out.push((t.size().iter().map(|&d| d as usize).collect(), bytes));
        offset += n;
    }
    Ok(out)
}

/// Prefix of the model's tensors: the weights that are validated and used.
pub const MODEL: &str = "model.";
/// Prefix of the trained weights, where a run validates others (their moving average).
pub const TRAINED: &str = "train.";

/// Writes a checkpoint atomically.
pub fn save(
    path: &Path,
    meta: &CheckpointMeta,
    vs: &VarStore,
    optimizer: &[(String, Tensor)],
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (format!("{MODEL}{k}"), t))
        .collect();
    named.extend(
        optimizer
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone())),
    );
    write_named(path, meta, &named)
}

/// Writes named tensors (already prefixed `model.` / `adam.`) and metadata atomically.
fn write_named(path: &Path, meta: &CheckpointMeta, named: &[(String, Tensor)]) -> Result<()> {
    let tensors: Vec<&Tensor> = named.iter().map(|(_, t)| t).collect();
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .iter()
        .zip(to_bytes(&tensors)?)
        .map(|((k, _), (shape, bytes))| (k.clone(), shape, bytes))
        .collect();
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, shape, bytes)| {
            Ok((
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = meta.clone();
    meta.version = VERSION;
    meta.tensors_sha256 =
        Some(tensors_sha256(raw.iter().map(|(k, shape, bytes)| {
            (k.as_str(), shape.as_slice(), bytes.as_slice())
        })));
    let info = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&meta)?)]);
    let bytes = safetensors::serialize(views, &Some(info))?;
    write_atomic(path, &bytes)
}

/// The whole checkpoint file, refused when it is not a regular file or holds more than
/// [`MAX_FILE_BYTES`] (counted while reading, so a file growing meanwhile is refused too).
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let shown = path.display();
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read checkpoint {shown}"))?;
    if !meta.is_file() {
        bail!("{shown}: not a regular file");
    }
    let size = meta.len();
    if size > MAX_FILE_BYTES {
        bail!("{shown}: {size} bytes, larger than any checkpoint (limit {MAX_FILE_BYTES})");
    }
    let mut bytes = Vec::with_capacity(size as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read checkpoint {shown}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("{shown}: larger than any checkpoint (limit {MAX_FILE_BYTES} bytes)");
    }
    Ok(bytes)
}

/// A tensor's shape for libtorch, refused (with the reason, to follow the tensor's name) when a
/// dimension, or the product of the non-zero ones, exceeds what a checkpoint can hold; so a
/// zero-size tensor with a huge other dimension is refused too instead of overflowing strides.
fn torch_shape(shape: &[usize]) -> Result<Vec<i64>, String> {
    let limit = MAX_FILE_BYTES / 4;
    let span = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul((d as u64).max(1)));
    match span {
        Some(n) if n <= limit => Ok(shape.iter().map(|&d| d as i64).collect()),
        _ => Err(format!(
            "has shape {shape:?}, larger than any checkpoint holds ({limit} values)"
        )),
    }
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads and checks a checkpoint: size, format, every metadata field, and the tensors'
    /// checksum. Every error names the file.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display();
        let bytes = read_bounded(path)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{shown}: not a trainer checkpoint ({e:?})"))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .with_context(|| format!("{shown}: a safetensors file without trainer metadata"))?;
        let meta: CheckpointMeta = serde_json::from_str(meta_json)
            .with_context(|| format!("{shown}: unreadable trainer metadata"))?;
        if meta.format != FORMAT || meta.version > VERSION {
            bail!(
                "{shown}: checkpoint format {} v{} is not supported",
                meta.format,
                meta.version
            );
        }
        meta.validate()
            .map_err(|e| anyhow::anyhow!("{shown}: bad metadata: {e}"))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e:?}"))?;
        let views = st.tensors();
        if let Some((name, _)) = views.iter().find(|(_, v)| v.dtype() != Dtype::F32) {
            bail!("{shown}: tensor {name} is not float32");
        }
        match &meta.tensors_sha256 {
            Some(expected) => {
                let actual =
                    tensors_sha256(views.iter().map(|(k, v)| (k.as_str(), v.shape(), v.data())));
                if &actual != expected {
                    bail!("{shown}: the tensors do not match their checksum; the file is damaged");
                }
            }
            None if meta.version >= 2 => bail!("{shown}: the tensors' checksum is missing"),
            None => {}
        }
        let mut tensors = HashMap::new();
        for (name, view) in views {
            let shape = torch_shape(view.shape())
                .map_err(|e| anyhow::anyhow!("{shown}: tensor {name} {e}"))?;
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let tensor = Tensor::from_slice(&values)
                .f_reshape(&shape)
                .map_err(|e| anyhow::anyhow!("{shown}: tensor {name}: {e}"))?;
            tensors.insert(name, tensor);
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Copies the model tensors into a VarStore built for this checkpoint; every variable must be
    /// there with the same shape.
    pub fn load_model(&self, vs: &VarStore, file: &Path) -> Result<()> {
        self.load_prefixed(vs, MODEL, file)
    }

    /// As [`Checkpoint::load_model`], from the tensors named `<prefix><variable>`.
    pub fn load_prefixed(&self, vs: &VarStore, prefix: &str, file: &Path) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vs.variables() {
                let key = format!("{prefix}{name}");
                let src = self
                    .tensors
                    .get(&key)
                    .with_context(|| format!("{}: tensor {key} is missing", file.display()))?;
                if src.size() != var.size() {
                    bail!(
                        "{}: tensor {key} has shape {:?}, the model expects {:?}",
                        file.display(),
                        src.size(),
                        var.size()
                    );
                }
                var.copy_(src);
            }
            Ok(())
        })
    }

    /// Writes this checkpoint (possibly with edited metadata) to `path`, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        write_named(path, &self.meta, &named)
    }

    /// True when the file is one of ours (safetensors with trainer metadata).
    pub fn is_checkpoint(path: &Path) -> bool {
        let mut head = [0u8; 8];
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map(|_| {
                let n = u64::from_le_bytes(head);
                n > 0 && n < 100_000_000
            })
            .unwrap_or(false)
            && !super::is_hdf5(path)
    }
}

#[cfg(test)]
mod tests {
    use super::torch_shape;

    #[test]
    fn overflowing_shapes_are_refused_not_wrapped() {
        assert_eq!(torch_shape(&[3, 4]).unwrap(), vec![3, 4]);
        assert_eq!(torch_shape(&[0, 7]).unwrap(), vec![0, 7]);
        for shape in [
            vec![0, 1 << 63],
            vec![usize::MAX, 0],
            vec![1 << 32, 1 << 32],
            vec![0, 1 << 20, 1 << 20],
        ] {
            let err = torch_shape(&shape).unwrap_err();
            assert!(
                err.contains("larger than any checkpoint"),
                "{shape:?}: {err}"
            );
        }
    }
}
