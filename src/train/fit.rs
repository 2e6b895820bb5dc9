//! `trainer fit`, orchestrated: the data (decoded once, split), the learner, then per epoch the
//! training step ([`super::step`]), validation ([`super::validate`]), the checkpoint saver
//! ([`super::saver`]) and the run logs ([`super::runlog`]), in the run folder
//! ([`super::run_dir`]), with the settings resolved once ([`super::settings`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::amp;
use super::learner::{self, Model};
use super::recipe::{self, PosWeight};
use super::run_dir::{self, LAST, RESULTS, STOPPED};
use super::runlog::{RunLog, RunLogs};
use super::saver::{Best, Saver};
use super::settings::{FitSettings, Resume};
use super::step::{self, Loop, StaticInputs, Trained};
use super::validate;
use crate::data::augment::Augment;
use crate::data::dataset;
use crate::data::taxonomy::Taxonomy;
use crate::fsutil::write_atomic;
use crate::history::EpochRecord;
use crate::model::checkpoint::Checkpoint;
use crate::model::precision::Precision;
use crate::say;

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
        run_dir::refuse_existing_run(run_dir)?;
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
    let (cache, source) = decode(settings, samples, &taxonomy)?;
    let (train_idx, val_idx) = run_dir::split(settings, run_dir, resume, &cache)?;
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

/// The dataset's images decoded once at the run's size: from the disk cache where one is used,
/// and how (for the message).
fn decode(
    settings: &FitSettings,
    samples: Vec<dataset::Sample>,
    taxonomy: &Taxonomy,
) -> Result<(dataset::ImageCache, String)> {
    Ok(match &settings.cache_dir {
        Some(dir) => {
            let (cache, how) = crate::data::disk_cache::load(
                dir,
                &settings.data,
                samples,
                taxonomy,
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
                dataset::load_cache(&settings.data, samples, taxonomy, settings.image_size)?;
            (
                cache,
                format!("decoded in {:.1} s", t0.elapsed().as_secs_f64()),
            )
        }
    })
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

/// Trains a new run in `run_dir`, or continues `resume` (then `settings` come from its
/// checkpoint, with what `--resume` may change). With `group`, this process is one rank of a
/// job: every rank trains its share of each batch, and rank 0 alone validates and writes.
pub fn fit(
    settings: &FitSettings,
    run_dir: &Path,
    resume: Option<Resume>,
    device: Device,
    group: Option<crate::dist::Group>,
) -> Result<FitSummary> {
    settings.validate()?;
    let world = group.as_ref().map_or(1, |g| g.job.world);
    let rank0 = group.as_ref().is_none_or(|g| g.job.rank == 0);
    let micro = check_parts(settings, world)?;
    if let Some(why) = settings
        .cuda_graphs
        .then(|| super::graph::refusal(settings, device, world))
        .flatten()
    {
        bail!("{why}");
    }
    if device.is_cuda() {
        // Input shapes are fixed per run: let cuDNN pick its fastest kernels once.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let data = load_data(settings, run_dir, resume.map(|r| r.checkpoint))?;
    let last_path = run_dir.join(LAST);
    let previous = data.previous.as_ref().map(|p| (p, last_path.as_path()));
    let model = learner::model_and_optimizer(settings, &data.taxonomy, previous, device, rank0)?;
    let ddp = match group {
        Some(g) => Some(super::ddp::Ddp::new(g, &model.vs, &model.adam.params())?),
        None => None,
    };
    if let Some(prev) = &data.previous {
        say!(
            "resuming {} after epoch {}",
            run_dir.display(),
            prev.meta.epoch
        );
    }
    let pos_weight = pos_weight(settings, &data, device);
    let _lock = match rank0 {
        true => {
            let val: Vec<&Path> = (data.val_idx.iter())
                .map(|&i| data.cache.samples[i as usize].path.as_path())
                .collect();
            Some(run_dir::prepare(
                settings,
                run_dir,
                data.previous.is_some(),
                &val,
            )?)
        }
        false => None,
    };
    say_layout(settings, world, micro);
    let pixels = device_pixels(&data.cache, device);
    let targets = data.cache.targets.to_device(device);
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
    let mut inputs = StaticInputs::new(micro, settings.augment == Augment::Original, device);
    // With graphs (one rank: see graph::refusal), the training step's and validation's.
    let mut eval_graph = None;
    if settings.cuda_graphs {
        match pixels.device() == device {
            true => {
                inputs.use_graph(super::graph::StepGraph::new(device)?);
                let labels = data.taxonomy.labels.len();
                let batch = validation_batch(settings);
                eval_graph = Some(validate::EvalGraph::new(batch, labels, device)?);
            }
            false => say!("warning: --cuda-graphs on needs the image cache on the device; the steps run without a graph"),
        }
    }
    run_epochs(&lp, model, &data, (inputs, eval_graph), rank0)
}

/// The run's state between epochs: the best epoch and every epoch's record.
struct Progress {
    best: Best,
    history: Vec<EpochRecord>,
    /// The validation's CUDA graph (`--cuda-graphs on`, the image cache on the device).
    eval_graph: Option<validate::EvalGraph>,
}

/// The epochs of this session, from the one after the previous checkpoint's.
fn run_epochs(
    lp: &Loop,
    mut model: Model,
    data: &Data,
    (mut inputs, eval_graph): (StaticInputs, Option<validate::EvalGraph>),
    rank0: bool,
) -> Result<FitSummary> {
    let (settings, run_dir) = (lp.settings, lp.run_dir);
    let prev = data.previous.as_ref();
    let start_epoch = prev.map_or(1, |p| p.meta.epoch + 1);
    let mut progress = Progress {
        best: prev.map_or_else(Best::default, |p| Best::resumed(&p.meta, settings.best_by)),
        history: prev.map_or_else(Vec::new, |p| {
            run_dir::resumed_history(p, &run_dir.join(RESULTS))
        }),
        eval_graph,
    };
    let mut logs = RunLogs::default();
    if rank0 {
        let steps = data.train_idx.len().div_ceil(settings.batch_size);
        let start_step = ((start_epoch - 1) * steps) as u64;
        logs = RunLogs::for_run(settings, run_dir, &data.taxonomy.labels, start_step)?;
        logs.begin(&progress.history)?;
    }
    let mut scaler = amp::LossScaler::default();
    let mut summary = FitSummary {
        run_dir: run_dir.to_path_buf(),
        epochs_done: start_epoch - 1,
        best_val_loss: progress.best.val_loss,
        interrupted: false,
        stopped: None,
    };
    for epoch in start_epoch..=settings.epochs {
        let train_idx = &data.train_idx;
        let trained = step::train_epoch(
            lp,
            &mut model,
            train_idx,
            epoch,
            &mut inputs,
            &mut scaler,
            &mut logs,
        )?;
        if trained.interrupted {
            summary.interrupted = true;
            return Ok(summary);
        }
        let stop = match rank0 {
            true => finish_epoch(lp, &model, data, &trained, epoch, &mut progress, &mut logs)?,
            false => None,
        };
        summary.epochs_done = epoch;
        summary.best_val_loss = progress.best.val_loss;
        // Every rank stops where rank 0 decided to.
        let stopping = match lp.ddp {
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

/// Rank 0 after an epoch's training: validation of the used weights, the epoch's record, the
/// checkpoints, the logs, then the Keras weights of a best epoch (a failure at any point, a full
/// disk, leaves a results.csv with one row per checkpointed epoch, or a checkpoint that can
/// rebuild it). Returns the reason to stop early, if any.
fn finish_epoch(
    lp: &Loop,
    model: &Model,
    data: &Data,
    trained: &Trained,
    epoch: usize,
    progress: &mut Progress,
    logs: &mut dyn RunLog,
) -> Result<Option<String>> {
    let started = Instant::now();
    let settings = lp.settings;
    learner::update_used_weights(model, settings, lp.pixels, &trained.order);
    let (_, used_net) = model.used();
    let validation = validate::validate(
        used_net,
        lp.pixels,
        lp.targets,
        &data.val_idx,
        validation_batch(settings),
        settings.channels_last,
        progress.eval_graph.as_mut(),
    )?;
    if let Some(v) = validation
        .as_ref()
        .map(|v| v.loss)
        .filter(|v| !v.is_finite())
    {
        bail!(
            "epoch {epoch}: the validation loss is {v}; stopping. {}; a lower --lr may help",
            run_dir::kept_checkpoint(lp.run_dir, epoch)
        );
    }
    let record = EpochRecord {
        epoch,
        train_loss: trained.loss,
        lr: model.adam.lr(),
        epoch_time_s: trained.seconds + started.elapsed().as_secs_f64(),
        train_images_per_s: trained.images as f64 / trained.seconds.max(1e-9),
        validation,
    };
    let best = progress.best.offer(&record, settings.best_by);
    progress.history.push(record.clone());
    let saver = Saver {
        settings,
        run_dir: lp.run_dir,
        taxonomy: &data.taxonomy,
    };
    saver.save(model, &progress.history, &progress.best)?;
    logs.epoch(&progress.history, best)?;
    if best {
        saver.save_keras(model, &record)?;
    }
    let stop = progress.best.stop_reason(settings, epoch);
    Ok(stop.filter(|_| epoch < settings.epochs))
}

/// Images per validation batch (no gradients kept: twice the training batch).
fn validation_batch(settings: &FitSettings) -> usize {
    settings.batch_size * 2
}

/// `--pos-weight auto`: each label's negatives over positives in the training split.
fn pos_weight(settings: &FitSettings, data: &Data, device: Device) -> Option<Tensor> {
    if settings.recipe.pos_weight != PosWeight::Auto {
        return None;
    }
    let labels = &data.taxonomy.labels;
    let rows: Vec<usize> = data.train_idx.iter().map(|&i| i as usize).collect();
    let targets = validate::to_vec(&data.cache.targets);
    let w = recipe::pos_weights(&targets, labels.len(), &rows);
    let shown: Vec<String> = labels
        .iter()
        .zip(&w)
        .map(|(l, w)| format!("{l} {w:.2}"))
        .collect();
    say!(
        "pos_weight (negatives/positives of the training split): {}",
        shown.join(", ")
    );
    Some(
        Tensor::from_slice(&w)
            .to_kind(Kind::Float)
            .to_device(device),
    )
}

/// The precision, memory format and split of each step, for the log.
fn say_layout(settings: &FitSettings, world: usize, micro: usize) {
    say!(
        "precision {}, {}{}{}",
        format!("{:?}", settings.precision).to_lowercase(),
        if settings.channels_last {
            "channels-last"
        } else {
            "contiguous (NCHW)"
        },
        match settings.cuda_graphs {
            true => ", CUDA graphs",
            false => "",
        },
        match world * settings.accumulate {
            1 => String::new(),
            _ => format!(
                "; {world} rank(s) x {} micro-batch(es) of {micro} images per step",
                settings.accumulate
            ),
        }
    );
}

/// The uint8 image cache on the training device when it fits (6,405 images at 224 take 0.96 GB);
/// otherwise batches are gathered in host memory and copied.
fn device_pixels(cache: &dataset::ImageCache, device: Device) -> Tensor {
    match cache.pixels.f_to(device) {
        Ok(t) => t,
        Err(e) => {
            let mb = cache.pixels.numel() as f64 / 1e6;
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("");
            say!("warning: the image cache ({mb:.0} MB) does not fit on {device:?} ({reason}); keeping it in host memory");
            cache.pixels.shallow_clone()
        }
    }
}
