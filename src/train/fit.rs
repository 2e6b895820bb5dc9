//! The fit loop: dataset -> cache -> split -> epochs of augmented Adam steps -> validation
//! metrics -> CSV row, checkpoints and Keras weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::nn::ModuleT;
use tch::{nn, Device, Kind, Reduction, Tensor};

use super::adam::Adam;
use super::amp;
use super::recipe::{self, PosWeight, RecipeSettings};
use super::shadow::{self, Shadow};
use crate::csvfile;
use crate::data::augment::{self, Augment};
use crate::data::dataset;
use crate::data::preprocess;
use crate::data::split::{self, split_indices};
use crate::data::taxonomy::Taxonomy;
use crate::fsutil::write_atomic;
use crate::metrics::{self, Counts};
use crate::model::arch::Arch;
use crate::model::checkpoint::{self, Checkpoint, CheckpointMeta, Preprocessing};
use crate::model::efficientnet::{Tagger, TaggerConfig};
use crate::model::precision::{self, Precision};
use crate::model::{is_hdf5, keras, DEFAULT_INFER_THRESHOLD};
use crate::progress;

/// Informational output: from rank 0 only when several ranks train.
macro_rules! say {
    ($($arg:tt)*) => {
        if !progress::quiet() {
            crate::errln!($($arg)*);
        }
    };
}

/// The settings of a run, saved in its checkpoints so a resume continues with the same ones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FitSettings {
    pub data: PathBuf,
    pub taxonomy: Option<PathBuf>,
    pub weights_dir: PathBuf,
    pub seed: u64,
    pub val_fraction: f64,
    pub augment: Augment,
    pub image_size: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub drop_connect: f64,
    pub init: Option<PathBuf>,
    /// Forward-pass precision (bf16 or fp16 autocast, or fp32).
    #[serde(default = "fp32")]
    pub precision: Precision,
    /// Activations and convolution kernels in channels-last memory order.
    #[serde(default)]
    pub channels_last: bool,
    /// The recipe's options beyond the original's (all off in the original recipe).
    #[serde(default)]
    pub recipe: RecipeSettings,
    /// Micro-batches whose gradients one optimizer step accumulates (per rank).
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Folder of the decoded-image files (none: decode into memory at every run). A property of
    /// the machine, not of the run: not saved.
    #[serde(skip)]
    pub cache_dir: Option<PathBuf>,
    /// The EfficientNet variant; not written for B0, so a B0 run's settings are as before.
    #[serde(default, skip_serializing_if = "Arch::is_b0")]
    pub arch: Arch,
}

fn one() -> usize {
    1
}

fn fp32() -> Precision {
    Precision::Fp32
}

/// Largest batch accepted (memory is bounded by the batch).
pub const MAX_BATCH: usize = 4096;
/// Most epochs a run may ask for.
pub const MAX_EPOCHS: usize = 1_000_000;

impl FitSettings {
    /// Checks every number against its range (the command line does too; this also covers
    /// settings read back from a checkpoint). The error names the setting and its range.
    pub fn validate(&self) -> Result<()> {
        let (min, max) = (checkpoint::MIN_IMAGE_SIZE, checkpoint::MAX_IMAGE_SIZE);
        let checks = [
            (
                self.lr.is_finite() && self.lr > 0.0,
                format!("lr {} must be a positive number", self.lr),
            ),
            (
                (1..=MAX_BATCH).contains(&self.batch_size),
                format!("batch_size {} must be in [1, {MAX_BATCH}]", self.batch_size),
            ),
            (
                (1..=MAX_EPOCHS).contains(&self.epochs),
                format!("epochs {} must be in [1, {MAX_EPOCHS}]", self.epochs),
            ),
            (
                (min..=max).contains(&self.image_size),
                format!("image_size {} must be in [{min}, {max}]", self.image_size),
            ),
            (
                (0.0..1.0).contains(&self.val_fraction),
                format!("val_fraction {} must be in [0, 1)", self.val_fraction),
            ),
            (
                (0.0..1.0).contains(&self.drop_connect),
                format!("drop_connect {} must be in [0, 1)", self.drop_connect),
            ),
            (
                (1..=MAX_BATCH).contains(&self.accumulate),
                format!("accumulate {} must be in [1, {MAX_BATCH}]", self.accumulate),
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, message)) => bail!("{message}"),
            None => self
                .recipe
                .validate(self.epochs)
                .map_err(anyhow::Error::msg),
        }
    }
}

/// What a run ended with.
#[derive(Debug)]
pub struct FitSummary {
    pub run_dir: PathBuf,
    pub epochs_done: usize,
    pub best_val_loss: Option<f64>,
    pub interrupted: bool,
    /// Why the run ended before its last epoch (early stopping).
    pub stopped: Option<String>,
}

use crate::data::split::VAL_LIST;
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

/// The seed of epoch `epoch`'s random numbers (shuffle, augmentation, drop-connect).
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(epoch as u64)
}

fn csv_header(labels: &[String]) -> String {
    let mut cols: Vec<String> = [
        "epoch",
        "train_loss",
        "val_loss",
        "val_micro_f1",
        "val_macro_f1",
        "lr",
        "epoch_time_s",
        "train_images_per_s",
    ]
    .map(String::from)
    .to_vec();
    for l in labels {
        for m in ["precision", "recall", "f1", "support"] {
            cols.push(format!("{m}/{l}"));
        }
    }
    // Each column begins with its metric's name, so a label never starts a field.
    csvfile::record(cols)
}

/// The rows to keep on resume: the checkpoint's own history (every epoch up to it), or, for a
/// checkpoint written before histories were kept, the CSV's rows of the epochs before `start`.
fn resumed_rows(previous: &Checkpoint, csv_path: &Path) -> Vec<String> {
    if !previous.meta.history.is_empty() {
        return previous.meta.history.clone();
    }
    let text = std::fs::read_to_string(csv_path).unwrap_or_default();
    let records = csvfile::read_records(&text, &csv_path.display().to_string()).unwrap_or_default();
    records
        .iter()
        .skip(1)
        .filter(|r| {
            r.get(0)
                .and_then(|e| e.parse::<usize>().ok())
                .is_some_and(|e| e <= previous.meta.epoch)
        })
        .map(csvfile::record)
        .collect()
}

/// Writes `results.csv` whole (atomically): the header, then one row per checkpointed epoch.
fn write_results(path: &Path, labels: &[String], rows: &[String]) -> Result<()> {
    let mut text = csv_header(labels) + "\n";
    for row in rows {
        text += row;
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// A new run may not start in a folder that already holds one.
fn refuse_existing_run(run_dir: &Path) -> Result<()> {
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
fn open_run_dir(run_dir: &Path, resume: bool) -> Result<crate::fsutil::DirLock> {
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

/// The step's inputs at fixed addresses for full batches: indices into the image cache and the
/// augmentation parameters, refilled by a device-side copy at each step.
struct StaticInputs {
    batch: usize,
    ids: Tensor,
    params: Option<Tensor>,
}

impl StaticInputs {
    fn new(batch: usize, augment: bool, device: Device) -> Self {
        StaticInputs {
            batch,
            ids: Tensor::zeros([batch as i64], (Kind::Int64, device)),
            params: augment.then(|| {
                Tensor::zeros(
                    [batch as i64, augment::PARAMS as i64],
                    (Kind::Float, device),
                )
            }),
        }
    }

    /// The indices and augmentation parameters (if any) of the batch at `start`: the static
    /// buffers, refilled, for a full batch; plain slices for a partial one.
    fn fill(
        &mut self,
        order: &Tensor,
        params: Option<&Tensor>,
        start: i64,
        len: i64,
    ) -> (Tensor, Option<Tensor>) {
        let ids = order.narrow(0, start, len);
        let batch_params = params.map(|p| p.narrow(0, start, len));
        if len as usize != self.batch {
            return (ids, batch_params);
        }
        self.ids.copy_(&ids);
        let filled = match (&mut self.params, batch_params) {
            (Some(buf), Some(p)) => {
                buf.copy_(&p);
                Some(buf.shallow_clone())
            }
            (_, other) => other,
        };
        (self.ids.shallow_clone(), filled)
    }
}

/// Validation results of one epoch.
struct Validation {
    loss: f64,
    counts: Vec<Counts>,
}

/// Probabilities and the targets they are scored against (both on the CPU), and the mean BCE,
/// over the images `idx` of `pixels` / `targets`, in eval mode. The batches are gathered where the
/// pixels are (the device copy when it fits), the loss is summed on the device, and everything
/// comes back in one read at the end.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    net: &Tagger,
    pixels: &Tensor,
    targets: &Tensor,
    idx: &[i64],
    batch: usize,
    device: Device,
    channels_last: bool,
) -> (Tensor, Tensor, f64) {
    let (mut probs, mut ys) = (Vec::new(), Vec::new());
    let loss_sum = Tensor::zeros([], (Kind::Float, device));
    tch::no_grad(|| {
        for chunk in idx.chunks(batch.max(1)) {
            let ids = Tensor::from_slice(chunk).to_device(pixels.device());
            let x = preprocess::to_input(&pixels.index_select(0, &ids).to_device(device));
            let x = precision::layout(&x, channels_last);
            let y = targets
                .index_select(0, &ids.to_device(targets.device()))
                .to_device(device);
            let logits = net.forward_t(&x, false);
            let loss =
                logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Sum);
            let _ = loss_sum.shallow_clone().g_add_(&loss);
            probs.push(logits.sigmoid());
            ys.push(y);
        }
    });
    let labels = targets.size()[1];
    let host = |parts: &[Tensor]| match parts.is_empty() {
        true => Tensor::zeros([0, labels], (Kind::Float, Device::Cpu)),
        false => Tensor::cat(parts, 0).to_device(Device::Cpu),
    };
    (
        host(&probs),
        host(&ys),
        loss_sum.double_value(&[]) / (idx.len() as f64 * labels as f64).max(1.0),
    )
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
        .expect("floats")
}

/// Loads `--init`: a Keras HDF5 file (full, weights-only or backbone-only) or one of our
/// checkpoints with the same labels.
fn load_init(path: &Path, vs: &nn::VarStore, taxonomy: &Taxonomy, arch: Arch) -> Result<String> {
    if !path.is_file() {
        bail!("--init {}: no such file", path.display());
    }
    if is_hdf5(path) {
        let report =
            keras::load(path, vs).map_err(|e| match keras::holds_other_arch(&e, arch) {
                true => other_variant(path, taxonomy, arch, e),
                false => anyhow::Error::new(e).context(format!("--init {}", path.display())),
            })?;
        return Ok(report.to_string());
    }
    let ckpt = Checkpoint::read(path).with_context(|| format!("--init {}", path.display()))?;
    if ckpt.meta.arch != arch {
        bail!(
            "--init {}: a {} checkpoint; this run builds {arch}",
            path.display(),
            ckpt.meta.arch
        );
    }
    if ckpt.meta.taxonomy.labels != taxonomy.labels {
        bail!(
            "--init {}: its labels ({}) differ from this dataset's ({})",
            path.display(),
            ckpt.meta.taxonomy.labels.join(", "),
            taxonomy.labels.join(", ")
        );
    }
    ckpt.load_model(vs, path)?;
    Ok(format!("trainer checkpoint, epoch {}", ckpt.meta.epoch))
}

/// The error of a Keras `--init` file whose tensors do not fit the run's `arch`: it names B0 when
/// the file fits a B0 tagger (Keras files are read as B0 so far), another variant otherwise.
fn other_variant(
    path: &Path,
    taxonomy: &Taxonomy,
    arch: Arch,
    e: keras::KerasError,
) -> anyhow::Error {
    let vs = nn::VarStore::new(Device::Cpu);
    let config = TaggerConfig {
        num_classes: taxonomy.labels.len() as i64,
        ..Default::default()
    };
    let _net = Tagger::new(&vs.root(), config);
    let held = match keras::load(path, &vs) {
        Ok(_) => format!("{} weights", Arch::B0),
        Err(_) => "another variant".to_string(),
    };
    anyhow::anyhow!(
        "--init {}: the Keras file holds {held}, not {arch} (--arch): its tensors do not fit ({e})",
        path.display()
    )
}

/// The model being trained, its optimizer, and the weights that are validated when the recipe
/// makes them differ from the trained ones.
pub struct Model {
    pub vs: nn::VarStore,
    pub net: Tagger,
    pub adam: Adam,
    /// The moving average or precise-BN copy (with drop-connect off) that is validated,
    /// checkpointed as the model and exported.
    pub shadow: Option<(Shadow, Tagger)>,
}

impl Model {
    /// The weights that are validated, checkpointed as the model and exported.
    pub fn used(&self) -> (&nn::VarStore, &Tagger) {
        match &self.shadow {
            Some((s, net)) => (&s.vs, net),
            None => (&self.vs, &self.net),
        }
    }

    /// The optimizer's state, and the trained weights where the model's are others, for a
    /// checkpoint.
    fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = self.adam.state();
        if self.shadow.is_some() {
            state.extend(
                self.vs
                    .variables()
                    .into_iter()
                    .map(|(k, t)| (format!("{}{k}", checkpoint::TRAINED), t)),
            );
        }
        state
    }
}

/// The model (from the previous checkpoint, `--init` or the seed) in the run's memory format, and
/// Adam with its moments made after the layout change, so each has its parameter's strides (the
/// multi-tensor kernels keep their fast path only with one layout across the lists).
pub fn model_and_optimizer(
    settings: &FitSettings,
    taxonomy: &Taxonomy,
    previous: Option<(&Checkpoint, &Path)>,
    device: Device,
    rank0: bool,
) -> Result<Model> {
    // The initial weights of what --init does not set come from the seed.
    tch::manual_seed(settings.seed as i64);
    let vs = nn::VarStore::new(device);
    let config = TaggerConfig {
        num_classes: taxonomy.labels.len() as i64,
        drop_connect: settings.drop_connect,
        arch: settings.arch,
    };
    let net = Tagger::new(&vs.root(), config);
    let uses_shadow = settings.recipe.ema.is_some() || settings.recipe.precise_bn > 0;
    // Only rank 0 validates and writes, so only it keeps the used weights.
    let keeps_shadow = uses_shadow && rank0;
    if let Some((prev, file)) = previous {
        match uses_shadow {
            true => prev.load_prefixed(&vs, checkpoint::TRAINED, file)?,
            false => prev.load_model(&vs, file)?,
        }
    } else if let Some(init) = &settings.init {
        let report = load_init(init, &vs, taxonomy, settings.arch)?;
        say!("init: {report}");
    } else if settings.arch.is_b0() {
        say!(
            "warning: training from random weights; to start from ImageNet, pass --init with the Keras EfficientNet-B0 \"notop\" file (efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5)"
        );
    } else {
        say!("warning: training {} from random weights", settings.arch);
    }
    if settings.channels_last {
        precision::vars_to_channels_last(&vs);
    }
    let shadow = match keeps_shadow {
        true => {
            let svs = nn::VarStore::new(device);
            let snet = Tagger::new(
                &svs.root(),
                TaggerConfig {
                    drop_connect: 0.0,
                    ..config
                },
            );
            if settings.channels_last {
                precision::vars_to_channels_last(&svs);
            }
            let shadow = Shadow::new(svs, &vs);
            if let Some((prev, file)) = previous {
                prev.load_model(&shadow.vs, file)?;
            }
            Some((shadow, snet))
        }
        false => None,
    };
    let mut adam = Adam::new(&vs, settings.lr);
    if device.is_cuda() {
        // One kernel launch for every parameter instead of six multi-tensor ones.
        adam.kernel = super::adam::Kernel::Fused;
    }
    if let Some((prev, _)) = previous {
        adam.load_state(prev.meta.optimizer_step, |k| {
            prev.tensors.get(k).map(|t| t.to_device(device))
        })?;
    }
    Ok(Model {
        vs,
        net,
        adam,
        shadow,
    })
}

/// Brings the used weights up to date at the end of an epoch: the shadow copy (without EMA) and
/// the precise batch-norm statistics over the first `--precise-bn` images of the epoch's order,
/// without augmentation.
fn update_used_weights(model: &Model, settings: &FitSettings, pixels: &Tensor, order: &Tensor) {
    let Some((shadow, net)) = &model.shadow else {
        return;
    };
    if settings.recipe.ema.is_none() {
        shadow.copy();
    }
    let images = settings.recipe.precise_bn.min(order.size()[0] as usize) as i64;
    if images == 0 {
        return;
    }
    let bs = settings.batch_size as i64;
    let device = order.device();
    let batches = (0..images).step_by(bs as usize).map(|start| {
        let ids = order.narrow(0, start, bs.min(images - start));
        let px = pixels.index_select(0, &ids.to_device(pixels.device()));
        precision::layout(
            &preprocess::to_input(&px.to_device(device)),
            settings.channels_last,
        )
    });
    shadow::precise_bn(
        &shadow.vs,
        crate::model::efficientnet::BN_MOMENTUM,
        batches,
        |x| {
            let _ = net.forward_t(x, true);
        },
    );
}

/// What the run trains on: its previous checkpoint (on resume), the taxonomy, the decoded images
/// and the split.
struct Data {
    previous: Option<Checkpoint>,
    taxonomy: Taxonomy,
    cache: dataset::ImageCache,
    train_idx: Vec<i64>,
    val_idx: Vec<i64>,
}

/// Stage 1: the previous checkpoint (on resume), the dataset, decoded once, and the split (rebuilt
/// from `val.txt` on resume).
fn load_data(settings: &FitSettings, run_dir: &Path, previous: Option<Checkpoint>) -> Result<Data> {
    let resume = previous.is_some();
    let previous = if let Some(prev) = previous {
        if settings.epochs <= prev.meta.epoch {
            bail!(
                "{} already holds {} epochs; pass --epochs with a larger number to train further",
                run_dir.display(),
                prev.meta.epoch
            );
        }
        Some(prev)
    } else {
        // Checked again under the run folder's lock, before anything is written.
        refuse_existing_run(run_dir)?;
        None
    };
    let (taxonomy, samples) = dataset::open(&settings.data, settings.taxonomy.as_deref())?;
    if let Some(prev) = &previous {
        if prev.meta.taxonomy != taxonomy {
            bail!(
                "{}: the dataset's taxonomy differs from the run's",
                settings.data.display()
            );
        }
    }
    let (cache, source) = match &settings.cache_dir {
        Some(dir) => {
            let (cache, how) = crate::data::disk_cache::load(
                dir,
                &settings.data,
                samples,
                &taxonomy,
                settings.image_size,
            )?;
            let verb = if how.reused {
                "read from"
            } else {
                "decoded into"
            };
            let source = format!("{verb} {} in {:.1} s", how.file.display(), how.seconds);
            (cache, source)
        }
        None => {
            let t0 = Instant::now();
            let cache =
                dataset::load_cache(&settings.data, samples, &taxonomy, settings.image_size)?;
            (
                cache,
                format!("decoded in {:.1} s", t0.elapsed().as_secs_f64()),
            )
        }
    };
    let (train_idx, val_idx) = split(settings, run_dir, resume, &cache)?;
    if train_idx.is_empty() {
        bail!(
            "no training images left after the validation split of {} images",
            cache.samples.len()
        );
    }
    say!(
        "data: {} images ({} train, {} validation), {} labels, {}x{} input; run folder {}",
        cache.samples.len(),
        train_idx.len(),
        val_idx.len(),
        taxonomy.labels.len(),
        settings.image_size,
        settings.image_size,
        run_dir.display()
    );
    say!("images {source}");
    Ok(Data {
        previous,
        taxonomy,
        cache,
        train_idx,
        val_idx,
    })
}

/// The training and validation indices, in index order: from the seed for a new run, from
/// `val.txt` on resume.
fn split(
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
        say!(
            "warning: {} of the {} validation images listed in {} are no longer in the dataset",
            names.len() - val.len(),
            names.len(),
            val_list.display()
        );
    }
    Ok((to_i64(train), to_i64(val)))
}

/// Stage 3 (rank 0): the run folder, created and locked only now that everything given was
/// usable, with `val.txt` and `settings.json` for a new run.
fn prepare_run_dir(
    settings: &FitSettings,
    run_dir: &Path,
    data: &Data,
) -> Result<crate::fsutil::DirLock> {
    let lock = open_run_dir(run_dir, data.previous.is_some())?;
    if data.previous.is_none() {
        let listing: String = data
            .val_idx
            .iter()
            .map(|&i| {
                split::val_list_entry(&settings.data, &data.cache.samples[i as usize].path) + "\n"
            })
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

/// The seed of a micro-batch's drop-connect masks when a step is split into several: it depends
/// only on the micro-batch's place in the global batch, so N ranks draw what one process
/// accumulating N micro-batches draws.
fn micro_seed(epoch_seed: u64, step: usize, parts: usize, part: usize) -> i64 {
    let place = (step * parts + part + 1) as u64;
    epoch_seed.wrapping_add(place.wrapping_mul(0xBF58_476D_1CE4_E5B9)) as i64
}

/// What one epoch of training gave.
struct Trained {
    loss: f64,
    images: usize,
    seconds: f64,
    order: Tensor,
    interrupted: bool,
}

/// The unchanging inputs of the training loop.
struct Loop<'a> {
    settings: &'a FitSettings,
    run_dir: &'a Path,
    pixels: &'a Tensor,
    targets: &'a Tensor,
    pos_weight: Option<&'a Tensor>,
    ddp: Option<&'a super::ddp::Ddp>,
    device: Device,
    /// Micro-batches of one step in the whole job (ranks x --accumulate).
    parts: usize,
}

/// Stage 4a: one epoch of optimizer steps. Each step's global batch is split into `parts`
/// micro-batches of equal size; this rank runs its --accumulate of them, gradients accumulate,
/// and the reducer (with several ranks) averages them during the last backward pass.
fn train_epoch(
    lp: &Loop,
    model: &mut Model,
    train_idx: &[i64],
    epoch: usize,
    inputs: &mut StaticInputs,
    scaler: &mut amp::LossScaler,
) -> Result<Trained> {
    let settings = lp.settings;
    let (device, bs) = (lp.device, settings.batch_size);
    let seed = epoch_seed(settings.seed, epoch);
    tch::manual_seed(seed as i64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order = train_idx.to_vec();
    order.shuffle(&mut rng);
    // The epoch's order and augmentation parameters go to the device in one transfer each;
    // the steps then only slice them, and the loss accumulates on the device.
    let order_t = Tensor::from_slice(&order).to_device(device);
    let params = (settings.augment == Augment::Original).then(|| {
        let p = augment::draw_params(&mut rng, order.len(), settings.image_size);
        Tensor::from_slice(&p)
            .view([order.len() as i64, augment::PARAMS as i64])
            .to_device(device)
    });
    // The schedule counts every batch; a last partial batch smaller than the number of
    // micro-batches gives no step (each micro-batch shrinks alike, what does not divide is left
    // out).
    let steps = order.len().div_ceil(bs);
    let run = match (order.len() - (steps - 1) * bs) / lp.parts {
        0 => steps - 1,
        _ => steps,
    };
    let rank = lp.ddp.map_or(0, |d| d.rank());
    let bar = progress::bar(order.len() as u64, "images");
    bar.set_prefix(format!("epoch {epoch}/{}", settings.epochs));
    let t0 = Instant::now();
    let loss_acc = Tensor::zeros([], (Kind::Float, device));
    let (mut seen, mut last_read) = (0usize, Instant::now());
    let trained = |interrupted: bool, loss: f64, images: usize| Trained {
        loss,
        images,
        seconds: t0.elapsed().as_secs_f64(),
        order: order_t.shallow_clone(),
        interrupted,
    };
    for step in 0..run {
        let stop = progress::interrupted();
        if lp.ddp.map_or(Ok(stop), |d| d.any(stop))? {
            bar.finish_and_clear();
            return Ok(trained(true, f64::NAN, seen));
        }
        let start = step * bs;
        let each = bs.min(order.len() - start) / lp.parts;
        model.adam.lr = settings.recipe.lr_at(
            settings.lr,
            (epoch - 1) * steps + step,
            steps,
            settings.epochs,
        );
        model.adam.zero_grad();
        for k in 0..settings.accumulate {
            let part = rank * settings.accumulate + k;
            if lp.parts > 1 {
                tch::manual_seed(micro_seed(seed, step, lp.parts, part));
            }
            let at = (start + part * each) as i64;
            let loss = micro_step(
                lp,
                model,
                inputs,
                &order_t,
                params.as_ref(),
                at,
                each,
                epoch,
            )?;
            if settings.precision == Precision::Fp16 {
                scaler
                    .backward(&loss)
                    .map_err(|e| exchange_failed(lp.ddp, e))?;
                if scaler.unscale(&model.adam.grads())? {
                    model.adam.step();
                }
            } else {
                // With several ranks the reducer exchanges gradients inside backward, so a rank
                // that stopped shows here.
                (&loss / settings.accumulate as f64)
                    .f_backward()
                    .map_err(|e| exchange_failed(lp.ddp, e))?;
            }
            tch::no_grad(|| {
                let _ = loss_acc
                    .shallow_clone()
                    .g_add_(&(loss.detach() * each as f64));
            });
            seen += each;
        }
        if settings.precision != Precision::Fp16 {
            model.adam.step();
        }
        if let (Some(decay), Some((shadow, _))) =
            (settings.recipe.ema_decay(model.adam.step), &model.shadow)
        {
            shadow.average(decay);
        }
        bar.inc((each * settings.accumulate) as u64);
        // Read the loss back (a device sync) about twice a second, and at the end.
        if last_read.elapsed().as_secs_f64() > 0.5 || step + 1 == run {
            last_read = Instant::now();
            let loss_so_far = loss_acc.double_value(&[]) / seen.max(1) as f64;
            if !loss_so_far.is_finite() {
                bar.finish_and_clear();
                bail!(
                    "epoch {epoch}, by step {}: the training loss is {loss_so_far}; stopping. {}; a lower --lr may help",
                    step + 1,
                    kept_checkpoint(lp.run_dir, epoch)
                );
            }
            bar.set_message(format!("loss {loss_so_far:.4}"));
        }
    }
    bar.finish_and_clear();
    // The job's mean loss over every image of the epoch.
    let sums = [loss_acc.double_value(&[]), seen as f64];
    let sums = match lp.ddp {
        Some(d) => d.sum(&sums)?,
        None => sums.to_vec(),
    };
    let (loss, images) = (sums[0] / sums[1].max(1.0), sums[1] as usize);
    Ok(trained(false, loss, images))
}

/// What a run stopped in `epoch` keeps, for its message.
fn kept_checkpoint(run_dir: &Path, epoch: usize) -> String {
    match epoch > 1 {
        true => format!(
            "{} (epoch {}) is kept",
            run_dir.join(LAST).display(),
            epoch - 1
        ),
        false => "no checkpoint had been written yet".to_string(),
    }
}

/// A failed backward pass: with several ranks, the gradient exchange (another rank stopped).
fn exchange_failed(ddp: Option<&super::ddp::Ddp>, e: tch::TchError) -> anyhow::Error {
    let reason = e.to_string();
    let reason = reason.lines().next().unwrap_or("").to_string();
    match ddp {
        Some(d) => anyhow::anyhow!(
            "rank {}: the gradient exchange across ranks failed (did another rank stop?): {reason}",
            d.rank()
        ),
        None => anyhow::anyhow!("backward pass failed: {reason}"),
    }
}

/// One micro-batch's forward pass and mean loss (the reducer armed for its backward pass).
#[allow(clippy::too_many_arguments)]
fn micro_step(
    lp: &Loop,
    model: &Model,
    inputs: &mut StaticInputs,
    order: &Tensor,
    params: Option<&Tensor>,
    at: i64,
    len: usize,
    epoch: usize,
) -> Result<Tensor> {
    let (settings, device) = (lp.settings, lp.device);
    // A full micro-batch reads its indices and augmentation parameters from buffers at fixed
    // addresses, filled by a copy (what a captured CUDA graph replays from); a partial one runs
    // eagerly from slices.
    let (ids, batch_params) = inputs.fill(order, params, at, len as i64);
    let px = if lp.pixels.device() == device {
        lp.pixels.index_select(0, &ids)
    } else {
        lp.pixels
            .index_select(0, &ids.to_device(lp.pixels.device()))
            .to_device(device)
    };
    let x = match &batch_params {
        Some(p) => augment::apply(&px, p),
        None => preprocess::to_input(&px),
    };
    let x = precision::layout(&x, settings.channels_last);
    let y = lp.targets.index_select(0, &ids);
    let net = &model.net;
    // While the backbone is frozen only the head gets gradients.
    let frozen = epoch <= settings.recipe.freeze_backbone_epochs;
    let logits = precision::autocast(settings.precision, device, || match frozen {
        true => net.head(&net.features_t(&x, true).detach()),
        false => net.forward_t(&x, true),
    });
    if let Some(d) = lp.ddp {
        d.before_backward()?;
    }
    Ok(logits
        .to_kind(Kind::Float)
        .binary_cross_entropy_with_logits::<&Tensor>(&y, None, lp.pos_weight, Reduction::Mean))
}

/// The run's record so far: best validation loss and its epoch, and the CSV rows.
struct Record {
    best: Option<f64>,
    best_epoch: Option<usize>,
    history: Vec<String>,
}

/// Stage 4b (rank 0): validation of the used weights, then the epoch's row, checkpoints, CSV,
/// Keras weights, terminal lines and picture. Returns the reason to stop early, if any.
#[allow(clippy::too_many_arguments)]
fn finish_epoch(
    lp: &Loop,
    model: &Model,
    data: &Data,
    trained: &Trained,
    epoch: usize,
    run_dir: &Path,
    record: &mut Record,
) -> Result<Option<String>> {
    let started = Instant::now();
    let settings = lp.settings;
    let labels = &data.taxonomy.labels;
    let train_time = trained.seconds;
    update_used_weights(model, settings, lp.pixels, &trained.order);
    let (used_vs, used_net) = model.used();
    let val_idx = &data.val_idx;
    let validation = (!val_idx.is_empty()).then(|| {
        let (probs, t, loss) = evaluate(
            used_net,
            lp.pixels,
            lp.targets,
            val_idx,
            settings.batch_size * 2,
            lp.device,
            settings.channels_last,
        );
        let counts = metrics::count(
            &to_vec(&probs),
            &to_vec(&t),
            labels.len(),
            &vec![0.5; labels.len()],
        );
        Validation { loss, counts }
    });
    let epoch_time = trained.seconds + started.elapsed().as_secs_f64();
    let images_per_s = trained.images as f64 / train_time.max(1e-9);

    // The epoch's row goes into the checkpoint's history, then the checkpoints, then the CSV
    // (rebuilt whole), then the Keras weights: a failure at any point (a full disk) leaves a
    // CSV with one row per checkpointed epoch, or a checkpoint that can rebuild it.
    let val_loss = validation.as_ref().map(|v| v.loss);
    if let Some(v) = val_loss.filter(|v| !v.is_finite()) {
        bail!(
            "epoch {epoch}: the validation loss is {v}; stopping. {}; a lower --lr may help",
            kept_checkpoint(run_dir, epoch)
        );
    }
    let improved = match (val_loss, record.best) {
        (Some(v), Some(b)) => v < b,
        (Some(_), None) => true,
        (None, _) => true,
    };
    if improved {
        record.best = val_loss;
        record.best_epoch = Some(epoch);
    }
    let row = results_row(
        epoch,
        trained.loss,
        validation.as_ref(),
        model.adam.lr,
        epoch_time,
        images_per_s,
        labels.len(),
    );
    record.history.push(row);
    let meta = CheckpointMeta {
        format: checkpoint::FORMAT.into(),
        version: checkpoint::VERSION,
        epoch,
        taxonomy: data.taxonomy.clone(),
        preprocessing: Preprocessing::original(settings.image_size),
        thresholds: vec![DEFAULT_INFER_THRESHOLD; labels.len()],
        drop_connect: settings.drop_connect,
        optimizer_step: model.adam.step,
        seed: settings.seed,
        val_loss,
        best_val_loss: record.best,
        best_epoch: record.best_epoch,
        settings: serde_json::to_value(settings)?,
        history: record.history.clone(),
        tensors_sha256: None,
        arch: settings.arch,
    };
    let state = model.extra_tensors();
    let last_path = run_dir.join(LAST);
    checkpoint::save(&last_path, &meta, used_vs, &state)?;
    if improved {
        checkpoint::save(&run_dir.join(BEST), &meta, used_vs, &state)?;
    }
    let csv_path = run_dir.join(RESULTS);
    write_results(&csv_path, labels, &record.history)?;
    if improved {
        let name = match val_loss {
            Some(v) => format!("val_loss{v:.3}.hdf5"),
            None => format!("loss{:.3}.hdf5", trained.loss),
        };
        keras::save_weights(used_vs, settings.arch, &settings.weights_dir.join(name))
            .with_context(|| format!("epoch {epoch} is checkpointed in {}", last_path.display()))?;
    }
    print_epoch(
        epoch,
        settings.epochs,
        trained.loss,
        validation.as_ref(),
        labels,
        epoch_time,
        images_per_s,
        improved,
    );
    if let Err(e) = draw_results(&csv_path, &run_dir.join("results.png"), labels) {
        crate::errln!("warning: cannot draw results.png: {e:#}");
    }
    let stop = recipe::stop_reason(
        settings.recipe.patience,
        epoch,
        record.best_epoch,
        record.best,
    );
    Ok(stop.filter(|_| epoch < settings.epochs))
}

/// Checks what several ranks or --accumulate cannot do yet.
fn check_parts(settings: &FitSettings, world: usize) -> Result<usize> {
    let micro = super::ddp::micro_batch(settings.batch_size, world, settings.accumulate)?;
    if world * settings.accumulate > 1 && settings.precision == Precision::Fp16 {
        bail!("--precision fp16 with several ranks or --accumulate is not supported; use bf16");
    }
    if world > 1 && settings.recipe.freeze_backbone_epochs > 0 {
        bail!("--freeze-backbone-epochs with several ranks is not supported (every parameter must get a gradient in every step)");
    }
    Ok(micro)
}

/// Trains a new run in `run_dir`, or resumes the one there from `previous`, its `last.ckpt`
/// (then `settings` come from that checkpoint, with `epochs` possibly raised by the caller). With `group`, this
/// process is one rank of a job: every rank trains its share of each batch, and rank 0 alone
/// validates and writes.
pub fn fit(
    settings: &FitSettings,
    run_dir: &Path,
    previous: Option<Checkpoint>,
    device: Device,
    group: Option<crate::dist::Group>,
) -> Result<FitSummary> {
    settings.validate()?;
    let world = group.as_ref().map_or(1, |g| g.job.world);
    let rank0 = group.as_ref().is_none_or(|g| g.job.rank == 0);
    let micro = check_parts(settings, world)?;
    if device.is_cuda() {
        // Input shapes are fixed per run: let cuDNN pick its fastest kernels once.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let data = load_data(settings, run_dir, previous)?;
    let last_path = run_dir.join(LAST);
    let mut model = model_and_optimizer(
        settings,
        &data.taxonomy,
        data.previous.as_ref().map(|p| (p, last_path.as_path())),
        device,
        rank0,
    )?;
    let ddp = match group {
        Some(g) => {
            let params = model.adam.params();
            Some(super::ddp::Ddp::new(g, &model.vs, &params)?)
        }
        None => None,
    };
    if let Some(prev) = &data.previous {
        say!(
            "resuming {} after epoch {}",
            run_dir.display(),
            prev.meta.epoch
        );
    }
    let labels = data.taxonomy.labels.clone();
    let pos_weight = (settings.recipe.pos_weight == PosWeight::Auto).then(|| {
        let rows: Vec<usize> = data.train_idx.iter().map(|&i| i as usize).collect();
        let w = recipe::pos_weights(&to_vec(&data.cache.targets), labels.len(), &rows);
        let shown: Vec<String> = labels
            .iter()
            .zip(&w)
            .map(|(l, w)| format!("{l} {w:.2}"))
            .collect();
        say!(
            "pos_weight (negatives/positives of the training split): {}",
            shown.join(", ")
        );
        Tensor::from_slice(&w)
            .to_kind(Kind::Float)
            .to_device(device)
    });
    let _lock = match rank0 {
        true => Some(prepare_run_dir(settings, run_dir, &data)?),
        false => None,
    };
    say!(
        "precision {}, {}{}",
        format!("{:?}", settings.precision).to_lowercase(),
        if settings.channels_last {
            "channels-last"
        } else {
            "contiguous (NCHW)"
        },
        match world * settings.accumulate {
            1 => String::new(),
            _ => format!(
                "; {world} rank(s) x {} micro-batch(es) of {micro} images per step",
                settings.accumulate
            ),
        }
    );

    // Results CSV: rebuilt from the checkpoint's history on resume, so it always holds one row
    // per checkpointed epoch.
    let csv_path = run_dir.join(RESULTS);
    let prev_meta = data.previous.as_ref().map(|p| &p.meta);
    let start_epoch = prev_meta.map_or(1, |m| m.epoch + 1);
    let mut record = Record {
        best: prev_meta.and_then(|m| m.best_val_loss),
        best_epoch: prev_meta.and_then(|m| m.best_epoch),
        history: match &data.previous {
            Some(prev) => resumed_rows(prev, &csv_path),
            None => Vec::new(),
        },
    };
    if rank0 {
        write_results(&csv_path, &labels, &record.history)?;
    }

    // The uint8 cache lives on the training device when it fits (6,405 images at 224 take
    // 0.96 GB); otherwise batches are gathered in host memory and copied.
    let cache = &data.cache;
    let pixels = match cache.pixels.f_to(device) {
        Ok(t) => t,
        Err(e) => {
            let mb = cache.pixels.numel() as f64 / 1e6;
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("");
            say!("warning: the image cache ({mb:.0} MB) does not fit on {device:?} ({reason}); keeping it in host memory");
            cache.pixels.shallow_clone()
        }
    };
    let targets = cache.targets.to_device(device);
    let lp = Loop {
        settings,
        run_dir,
        pixels: &pixels,
        targets: &targets,
        pos_weight: pos_weight.as_ref(),
        ddp: ddp.as_ref(),
        device,
        parts: world * settings.accumulate,
    };
    let mut scaler = amp::LossScaler::default();
    let mut summary = FitSummary {
        run_dir: run_dir.to_path_buf(),
        epochs_done: start_epoch - 1,
        best_val_loss: record.best,
        interrupted: false,
        stopped: None,
    };
    let mut inputs = StaticInputs::new(micro, settings.augment == Augment::Original, device);
    for epoch in start_epoch..=settings.epochs {
        let trained = train_epoch(
            &lp,
            &mut model,
            &data.train_idx,
            epoch,
            &mut inputs,
            &mut scaler,
        )?;
        if trained.interrupted {
            summary.interrupted = true;
            return Ok(summary);
        }
        let stop = match rank0 {
            true => finish_epoch(&lp, &model, &data, &trained, epoch, run_dir, &mut record)?,
            false => None,
        };
        summary.epochs_done = epoch;
        summary.best_val_loss = record.best;
        // Every rank stops where rank 0 decided to.
        let stopping = match &ddp {
            Some(d) => d.from_rank0(stop.is_some())?,
            None => stop.is_some(),
        };
        if stopping {
            let reason = stop.unwrap_or_else(|| "rank 0 stopped early".into());
            if rank0 {
                crate::errln!("{reason}");
                write_atomic(&run_dir.join(STOPPED), format!("{reason}\n").as_bytes())?;
            }
            summary.stopped = Some(reason);
            break;
        }
    }
    Ok(summary)
}

/// One `results.csv` row (see [`csv_header`]).
fn results_row(
    epoch: usize,
    train_loss: f64,
    validation: Option<&Validation>,
    lr: f64,
    epoch_time: f64,
    images_per_s: f64,
    n_labels: usize,
) -> String {
    let mut row = vec![
        epoch.to_string(),
        format!("{train_loss:.6}"),
        csvfile::opt(validation.map(|v| v.loss)),
        csvfile::opt(validation.map(|v| metrics::micro_f1(&v.counts))),
        csvfile::opt(validation.and_then(|v| metrics::macro_f1(&v.counts))),
        format!("{lr}"),
        format!("{epoch_time:.3}"),
        format!("{images_per_s:.2}"),
    ];
    for l in 0..n_labels {
        match validation {
            Some(v) => {
                let c = &v.counts[l];
                row.extend([
                    format!("{:.6}", c.precision()),
                    format!("{:.6}", c.recall()),
                    format!("{:.6}", c.f1()),
                    c.support().to_string(),
                ]);
            }
            None => row.extend(std::iter::repeat_n(String::new(), 4)),
        }
    }
    csvfile::record(row)
}

#[allow(clippy::too_many_arguments)]
fn print_epoch(
    epoch: usize,
    epochs: usize,
    train_loss: f64,
    validation: Option<&Validation>,
    labels: &[String],
    seconds: f64,
    images_per_s: f64,
    improved: bool,
) {
    let mut line = format!("epoch {epoch}/{epochs}  train_loss {train_loss:.4}");
    if let Some(v) = validation {
        line += &format!(
            "  val_loss {:.4}{}  micro-F1 {:.3}  macro-F1 {}",
            v.loss,
            if improved { " (best)" } else { "" },
            metrics::micro_f1(&v.counts),
            metrics::macro_f1(&v.counts)
                .map(|m| format!("{m:.3}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    line += &format!("  {seconds:.1} s, {images_per_s:.1} images/s");
    crate::errln!("{line}");
    if let Some(v) = validation {
        let width = labels.iter().map(|l| l.len()).max().unwrap_or(5).max(5);
        crate::errln!("  {:width$}  precision  recall     f1  support", "label");
        for (l, c) in labels.iter().zip(&v.counts) {
            crate::errln!(
                "  {l:width$}  {:>9.3}  {:>6.3}  {:>5.3}  {:>7}",
                c.precision(),
                c.recall(),
                c.f1(),
                c.support()
            );
        }
    }
}

/// `results.png` from `results.csv`: losses, micro/macro F1 and per-label F1 over epochs.
pub fn draw_results(csv: &Path, png: &Path, labels: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(csv)?;
    let records = csvfile::read_records(&text, &csv.display().to_string())?;
    let empty = csv::StringRecord::new();
    let (header, rows) = records.split_first().unwrap_or((&empty, &[]));
    let columns: std::collections::HashMap<&str, usize> =
        header.iter().enumerate().map(|(i, h)| (h, i)).collect();
    let series = |name: &str, title: &str| -> crate::plots::Series {
        let col = columns.get(name).copied();
        let points = rows
            .iter()
            .filter_map(|r| {
                let x: f64 = r.get(0)?.parse().ok()?;
                let y: f64 = r.get(col?)?.parse().ok()?;
                Some((x, y))
            })
            .collect();
        (title.to_string(), points)
    };
    let losses = vec![
        series("train_loss", "train"),
        series("val_loss", "validation"),
    ];
    let f1 = vec![
        series("val_micro_f1", "micro-F1"),
        series("val_macro_f1", "macro-F1"),
    ];
    let per_label: Vec<_> = labels
        .iter()
        .map(|l| series(&format!("f1/{l}"), l))
        .collect();
    crate::plots::training_curves(png, &losses, &f1, &per_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batches_come_from_buffers_at_fixed_addresses_and_partial_ones_from_slices() {
        let mut inputs = StaticInputs::new(4, true, Device::Cpu);
        let order = Tensor::from_slice(&[9i64, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
        let params = Tensor::arange(10 * augment::PARAMS as i64, (Kind::Float, Device::Cpu))
            .view([10, augment::PARAMS as i64]);
        let (a, pa) = inputs.fill(&order, Some(&params), 0, 4);
        let addresses = (a.data_ptr(), pa.as_ref().unwrap().data_ptr());
        let (b, pb) = inputs.fill(&order, Some(&params), 4, 4);
        let pb = pb.unwrap();
        assert_eq!((b.data_ptr(), pb.data_ptr()), addresses, "the same buffers");
        assert_eq!(Vec::<i64>::try_from(&b).unwrap(), [5, 4, 3, 2]);
        assert!(pb.equal(&params.narrow(0, 4, 4)));
        let (c, pc) = inputs.fill(&order, Some(&params), 8, 2);
        let pc = pc.unwrap();
        assert!(c.data_ptr() != addresses.0 && pc.data_ptr() != addresses.1);
        assert!(pc.equal(&params.narrow(0, 8, 2)));
        assert_eq!(Vec::<i64>::try_from(&c).unwrap(), [1, 0]);
    }

    #[test]
    fn adam_moments_have_their_parameters_strides_in_channels_last() {
        let settings = FitSettings {
            data: "data".into(),
            taxonomy: None,
            weights_dir: "w".into(),
            seed: 1,
            val_fraction: 0.1,
            augment: Augment::None,
            image_size: 64,
            lr: 1e-4,
            batch_size: 4,
            epochs: 1,
            drop_connect: 0.2,
            init: None,
            precision: Precision::Fp32,
            channels_last: true,
            recipe: Default::default(),
            accumulate: 1,
            cache_dir: None,
            arch: Default::default(),
        };
        let Model { vs, adam, .. } =
            model_and_optimizer(&settings, &Taxonomy::ndl(), None, Device::Cpu, true).unwrap();
        let state: std::collections::HashMap<String, Tensor> = adam.state().into_iter().collect();
        let vars = vs.variables();
        let stem = &vars["stem_conv.weight"];
        assert_eq!(
            stem.stride(),
            [27, 1, 9, 3],
            "the stem kernel is channels-last"
        );
        for (name, p) in &vars {
            if !p.requires_grad() {
                continue;
            }
            for kind in ["m", "v"] {
                let moment = &state[&format!("adam.{kind}.{name}")];
                assert_eq!(moment.stride(), p.stride(), "adam.{kind}.{name}");
            }
        }
    }
}
