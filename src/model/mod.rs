//! The network, its Keras weights and our checkpoints.

pub mod arch;
pub mod checkpoint;
pub mod efficientnet;
pub mod hdf5_safe;
pub mod keras;
pub mod onnx;
pub mod onnxruntime;
pub mod precision;
pub mod torchscript;

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Tensor};

use crate::data::taxonomy::Taxonomy;
use efficientnet::{Tagger, TaggerConfig};

/// The threshold of the original batch tagger.
pub const DEFAULT_INFER_THRESHOLD: f32 = 0.4;

/// A model ready to predict, with everything needed to feed it and read its outputs.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub net: Tagger,
    pub taxonomy: Taxonomy,
    /// Per-label thresholds to apply when the user gives none.
    pub thresholds: Vec<f32>,
    pub image_size: usize,
    /// What was loaded, for messages.
    pub description: String,
    /// The weights file.
    pub path: std::path::PathBuf,
    /// Forward-pass precision (fp32 unless the user opts into bf16 or fp16 autocast).
    pub precision: self::precision::Precision,
    /// The ONNX Runtime session that runs the forward pass instead of libtorch, once chosen.
    pub onnx: Option<self::onnxruntime::Engine>,
}

/// Which engine runs the forward pass of `infer` and `eval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// ONNX Runtime for fp32 on the CPU where its library loads, libtorch otherwise.
    Auto,
    /// libtorch on every device and precision.
    Torch,
    /// ONNX Runtime (fp32, CPU only); an error where its library cannot be loaded.
    Onnxruntime,
}

const HDF5_SIGNATURE: &[u8] = b"\x89HDF\r\n\x1a\n";

/// True when the file starts with the HDF5 signature.
pub fn is_hdf5(path: &Path) -> bool {
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| head == HDF5_SIGNATURE)
        .unwrap_or(false)
}

impl LoadedModel {
    /// Loads a model for inference from a Keras HDF5 file of any variant (the published NDL
    /// weights: NDL labels, the variant's resolution in BGR (224x224 for B0), threshold 0.4).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.is_file() {
            bail!("weights file {} does not exist", path.display());
        }
        if !is_hdf5(path) {
            if checkpoint::Checkpoint::is_checkpoint(path) {
                return Self::from_checkpoint(path, device);
            }
            bail!(
                "{}: unknown weights format (expected a Keras .hdf5/.h5 file or a trainer checkpoint)",
                path.display()
            );
        }
        let taxonomy = Taxonomy::ndl();
        let arch = keras::variant(path)?;
        let vs = nn::VarStore::new(device);
        let config = TaggerConfig {
            num_classes: taxonomy.labels.len() as i64,
            arch,
            ..Default::default()
        };
        let mut net = Tagger::new(&vs.root(), config);
        let report = keras::load(path, &vs, arch)?;
        if !report.head_loaded {
            bail!(
                "{}: holds only the backbone (no dense head), so it cannot tag images; train a model with `trainer fit --init {}`",
                path.display(),
                path.display()
            );
        }
        check_finite(&vs, path)?;
        let thresholds = vec![DEFAULT_INFER_THRESHOLD; taxonomy.labels.len()];
        // Channels-last: the memory order GPU convolutions want (same outputs, checked by the tests).
        self::precision::vars_to_channels_last(&vs);
        net.fold_batch_norms();
        Ok(LoadedModel {
            vs,
            net,
            taxonomy,
            thresholds,
            image_size: arch.coefficients().resolution,
            description: format!("{} ({report})", path.display()),
            path: path.to_path_buf(),
            precision: self::precision::Precision::Fp32,
            onnx: None,
        })
    }

    /// Loads one of our checkpoints: labels, thresholds and input size come from it.
    pub fn from_checkpoint(path: &Path, device: Device) -> Result<Self> {
        let ckpt = checkpoint::Checkpoint::read(path)?;
        let meta = &ckpt.meta;
        let vs = nn::VarStore::new(device);
        let config = TaggerConfig {
            num_classes: meta.taxonomy.labels.len() as i64,
            drop_connect: meta.drop_connect,
            arch: meta.arch,
        };
        let mut net = Tagger::new(&vs.root(), config);
        ckpt.load_model(&vs, path)?;
        check_finite(&vs, path)?;
        // Channels-last: the memory order GPU convolutions want (same outputs, checked by the tests).
        self::precision::vars_to_channels_last(&vs);
        net.fold_batch_norms();
        Ok(LoadedModel {
            vs,
            net,
            taxonomy: meta.taxonomy.clone(),
            thresholds: meta.thresholds.clone(),
            image_size: meta.preprocessing.image_size,
            description: format!(
                "{} (trainer checkpoint, epoch {})",
                path.display(),
                meta.epoch
            ),
            path: path.to_path_buf(),
            precision: self::precision::Precision::Fp32,
            onnx: None,
        })
    }

    /// Sets the engine of the forward pass, once the device and precision are set. Returns a note
    /// when `Auto` could not use ONNX Runtime and stays on libtorch.
    pub fn choose_engine(&mut self, engine: Engine) -> Result<Option<String>> {
        let cpu_fp32 =
            self.vs.device() == Device::Cpu && self.precision == self::precision::Precision::Fp32;
        match (engine, cpu_fp32) {
            (Engine::Torch, _) | (Engine::Auto, false) => return Ok(None),
            (Engine::Onnxruntime, false) => bail!(
                "--engine onnxruntime runs fp32 on the CPU only (leave out --precision, and give --device cpu)"
            ),
            _ => {}
        }
        match self.onnx_engine() {
            Ok(e) => {
                self.onnx = Some(e);
                Ok(None)
            }
            Err(e) if engine == Engine::Auto => {
                Ok(Some(format!("{e:#}; the forward pass runs on libtorch")))
            }
            Err(e) => Err(e),
        }
    }

    /// An ONNX Runtime session over this model's graph, with as many threads as libtorch uses.
    fn onnx_engine(&self) -> Result<self::onnxruntime::Engine> {
        let labels = &self.taxonomy.labels;
        let meta = self::onnx::Metadata {
            labels,
            thresholds: &self.thresholds,
            image_size: self.image_size,
            arch: self.net.config.arch,
        };
        let graph = self::onnx::export(&self.vs, &meta)?;
        let threads = tch::get_num_threads().max(1) as usize;
        self::onnxruntime::Engine::new(&graph, labels.len(), self.image_size, threads)
    }

    /// The engine of the forward pass, for messages.
    pub fn engine_name(&self) -> &'static str {
        if self.onnx.is_some() {
            "onnxruntime"
        } else {
            "libtorch"
        }
    }

    /// Probabilities for a batch of preprocessed images (`n * size * size * 3` BGR bytes). A
    /// probability that is not a finite number is an error naming the weights file.
    pub fn predict(&self, pixels: &[u8], n: usize) -> Result<Vec<f32>> {
        let probs = match &self.onnx {
            Some(engine) => engine.predict(pixels, n)?,
            None => self.predict_torch(pixels, n)?,
        };
        if probs.iter().any(|p| !p.is_finite()) {
            bail!(
                "{}: the model gives probabilities that are not numbers (NaN); the weights file is damaged or was trained into divergence",
                self.path.display()
            );
        }
        Ok(probs)
    }

    fn predict_torch(&self, pixels: &[u8], n: usize) -> Result<Vec<f32>> {
        let s = self.image_size as i64;
        let pixels = Tensor::from_slice(pixels).view([n as i64, s, s, 3]);
        let device = self.vs.device();
        // On CUDA: from page-locked memory, without waiting for the copy.
        let pixels = if device.is_cuda() {
            pixels
                .pin_memory(device)
                .to_device_(device, tch::Kind::Uint8, true, false)
        } else {
            pixels
        };
        let x = self::precision::channels_last(&crate::data::preprocess::to_input(&pixels));
        let probs = tch::no_grad(|| {
            self::precision::autocast(self.precision, device, || {
                tch::nn::ModuleT::forward_t(&self.net, &x, false)
            })
            .to_kind(tch::Kind::Float)
            .sigmoid()
        });
        Ok(Vec::<f32>::try_from(
            probs.to_device(Device::Cpu).flatten(0, -1),
        )?)
    }
}

/// Refuses a model with a weight that is NaN or infinite, naming the first such tensor.
pub fn check_finite(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut vars = vs.variables().into_iter().collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        let finite = tch::no_grad(|| t.isfinite().all().int64_value(&[]) != 0);
        if !finite {
            bail!(
                "{}: tensor {name} holds values that are not finite numbers (NaN or infinity)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Loads a model for `infer`, `eval` and `export`, fed `image_size` pixels where given (the
/// network is convolutional: any size runs); every error names the file.
pub fn load_for_inference(
    path: &Path,
    device: Device,
    image_size: Option<u32>,
) -> Result<LoadedModel> {
    let mut model = LoadedModel::load(path, device).context("cannot load the weights")?;
    if let Some(size) = image_size {
        model.image_size = size as usize;
    }
    Ok(model)
}
