//! Our checkpoint files: one safetensors file holding the model's tensors (`model.<name>`), the
//! optimizer's moments (`adam.m.<name>`, `adam.v.<name>`) and, in its metadata, a JSON
//! description: labels, taxonomy, preprocessing, thresholds, epoch, random-number state and the
//! run's settings. A model can thus never be run with the wrong labels or preprocessing.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::data::taxonomy::Taxonomy;
use crate::fsutil::write_atomic;

pub const FORMAT: &str = "trainer-checkpoint";
pub const VERSION: u32 = 1;
const META_KEY: &str = "trainer";

/// How images are turned into model inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub image_size: usize,
    /// Always "BGR": channels as `cv2.imread` returns them.
    pub channel_order: String,
    /// Always "opencv_inter_linear".
    pub resize: String,
    /// Pixel values are multiplied by this (1/255).
    pub scale: f64,
}

impl Preprocessing {
    pub fn original(image_size: usize) -> Self {
        Preprocessing {
            image_size,
            channel_order: "BGR".into(),
            resize: "opencv_inter_linear".into(),
            scale: 1.0 / 255.0,
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
}

fn to_bytes(t: &Tensor) -> (Vec<usize>, Vec<u8>) {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).expect("float tensor");
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    (shape, bytes)
}

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
        .map(|(k, t)| (format!("model.{k}"), t))
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
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(k, t)| {
            let (shape, bytes) = to_bytes(t);
            (k.clone(), shape, bytes)
        })
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
    let info = HashMap::from([(META_KEY.to_string(), serde_json::to_string(meta)?)]);
    let bytes = safetensors::serialize(views, &Some(info))?;
    write_atomic(path, &bytes)
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a trainer checkpoint ({e:?})", path.display()))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .with_context(|| {
                format!(
                    "{}: a safetensors file without trainer metadata",
                    path.display()
                )
            })?;
        let meta: CheckpointMeta = serde_json::from_str(meta_json)
            .with_context(|| format!("{}: unreadable trainer metadata", path.display()))?;
        if meta.format != FORMAT || meta.version > VERSION {
            bail!(
                "{}: checkpoint format {} v{} is not supported",
                path.display(),
                meta.format,
                meta.version
            );
        }
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                bail!("{}: tensor {name} is not float32", path.display());
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, Tensor::from_slice(&values).reshape(&shape));
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Copies the model tensors into a VarStore built for this checkpoint; every variable must be
    /// there with the same shape.
    pub fn load_model(&self, vs: &VarStore, file: &Path) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vs.variables() {
                let key = format!("model.{name}");
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
