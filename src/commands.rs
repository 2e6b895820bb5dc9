//! What each subcommand does, from checked arguments to a printed summary.

use std::process::ExitCode;

use anyhow::{bail, Result};

use crate::cli::{EvalArgs, ExportArgs, ExportFormat, FetchArgs, FitArgs, InferArgs, MemoryFormat};
use crate::device;
use crate::eval::{self, EvalOptions};
use crate::fetch::{self, Client, ClientOptions, MetadataFetch, TagFetch};
use crate::infer::{self, InferOptions};
use crate::model::load_for_inference;
use crate::model::precision::Precision;
use crate::train::fit;
use crate::train::loss::Loss;
use crate::train::recipe::RecipeSettings;
use crate::train::run_dir::{next_run_dir, LAST, STOPPED};
use crate::train::settings::{FitSettings, Overrides, Resume};

/// The model of `infer` and `eval`, in fp32 unless another precision is asked for.
fn load_model(
    weights: &std::path::Path,
    image_size: Option<u32>,
    device: tch::Device,
    precision: Option<Precision>,
    engine: crate::model::Engine,
) -> Result<crate::model::LoadedModel> {
    let mut model = load_for_inference(weights, device, image_size)?;
    model.precision = precision.unwrap_or(Precision::Fp32);
    if let Some(note) = model.choose_engine(engine)? {
        crate::errln!("note: {note}");
    }
    crate::errln!(
        "model: {}, {} on {}",
        model.description,
        format!("{:?}", model.precision).to_lowercase(),
        model.engine_name()
    );
    Ok(model)
}

/// `trainer infer`.
pub fn infer(args: InferArgs) -> Result<ExitCode> {
    let device = args.device.resolve()?;
    let model = load_model(
        &args.weights,
        args.image_size,
        device,
        args.precision,
        args.engine,
    )?;
    let opts = InferOptions {
        input: args.input,
        output: args.output,
        threshold: args.threshold,
        batch_size: args.batch_size as usize,
        overwrite: args.overwrite,
    };
    let s = infer::run(&model, &opts)?;
    if s.folders_done_before > 0 {
        crate::errln!(
            "left out {} folder(s) whose JSON file already exists (--overwrite tags them again)",
            s.folders_done_before
        );
    }
    let rate = s.images_tagged as f64 / s.seconds.max(1e-9);
    crate::errln!(
        "tagged {} images, skipped {}, {} JSON files in {} ({:.1} s, {:.1} images/s on {}; {:.1} s of it waiting for decoding)",
        s.images_tagged,
        s.skipped.len(),
        s.folders_written,
        opts.output.display(),
        s.seconds,
        rate,
        device::describe(device),
        s.waiting_seconds
    );
    if s.interrupted {
        crate::errln!("interrupted: the JSON files written are complete; run the same command again to redo the rest");
        return Ok(crate::progress::interrupted_exit_code());
    }
    Ok(ExitCode::SUCCESS)
}

/// The run's settings, resolved once: a new run's from the command line; on `--resume`, the
/// checkpoint's with what the command line may change. Then what belongs to this machine and
/// session, not to the run (the image cache, TensorBoard, CUDA graphs). Returns the run folder too, and the
/// run to continue.
fn fit_settings(
    args: FitArgs,
    device: tch::Device,
) -> Result<(FitSettings, std::path::PathBuf, Option<Resume>)> {
    let cache_dir = image_cache_dir(args.cache_dir.as_deref());
    let tensorboard = args.tensorboard == crate::cli::Switch::On;
    let cuda_graphs = args.cuda_graphs == crate::cli::Switch::On;
    let (settings, run_dir, resume) = match &args.resume {
        Some(run_dir) => {
            let overrides = Overrides {
                epochs: args.epochs,
                data: args.data,
                weights_dir: args.weights_dir,
                precision: args.precision,
                channels_last: args.memory_format.map(channels_last),
                accumulate: args.accumulate,
            };
            let resume = crate::train::run_dir::resume(run_dir)?;
            let settings = FitSettings::resumed(&resume, overrides)?;
            (settings, run_dir.clone(), Some(resume))
        }
        None => {
            let run_dir = match &args.run {
                Some(name) => args.runs_dir.join(name),
                None => next_run_dir(&args.runs_dir),
            };
            (new_run_settings(args, device)?, run_dir, None)
        }
    };
    let settings = FitSettings {
        cache_dir,
        tensorboard,
        cuda_graphs,
        ..settings
    };
    Ok((settings, run_dir, resume))
}

/// A new run's settings from the command line (what is not given: the recipe's presets, the
/// variant's resolution).
fn new_run_settings(args: FitArgs, device: tch::Device) -> Result<FitSettings> {
    let loss = Loss::from_flags(
        args.loss,
        args.gamma,
        args.asl_gamma_neg,
        args.asl_gamma_pos,
        args.asl_clip,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(FitSettings {
        recipe: recipe_settings(&args),
        accumulate: args.accumulate.unwrap_or(1),
        cache_dir: None,
        data: args.data.unwrap_or_else(|| "datasetpdm".into()),
        taxonomy: args.taxonomy,
        weights_dir: args
            .weights_dir
            .unwrap_or_else(|| "weights_pdm_multi".into()),
        seed: args.seed,
        val_fraction: args.val_fraction,
        augment: args.augment,
        image_size: args
            .image_size
            .map_or(args.arch.coefficients().resolution, |s| s as usize),
        lr: args.lr.unwrap_or(RecipeSettings::preset_lr(args.recipe)),
        batch_size: args.batch_size as usize,
        epochs: args.epochs.unwrap_or(100),
        drop_connect: args.drop_connect,
        init: args.init,
        precision: args.precision.unwrap_or(Precision::default_for(device)),
        channels_last: channels_last(args.memory_format.unwrap_or(MemoryFormat::Auto)),
        arch: args.arch,
        loss,
        best_by: args.best_by,
        tensorboard: false,
        cuda_graphs: false,
    })
}

/// `trainer fit`.
pub fn fit(args: FitArgs) -> Result<ExitCode> {
    let job = crate::dist::Job::from_env(|k| std::env::var(k).ok())?;
    if let Some(n) = args.nproc_per_node {
        if job.is_some() {
            bail!("--nproc-per-node starts ranks itself; under torchrun or srun (WORLD_SIZE is set), leave it out");
        }
        let all: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return crate::launch::run_local(n, crate::launch::without_nproc(&all));
    }
    let mut device = args.device.resolve_for_training()?;
    let group = match &job {
        Some(job) => {
            let (rank_device, group) = join_job(job, device, args.dist_timeout)?;
            device = rank_device;
            Some(group)
        }
        None => None,
    };
    let (settings, run_dir, resume) = fit_settings(args, device)?;
    if !crate::progress::quiet() {
        crate::errln!("device: {}", device::describe(device));
    }
    let s = fit::fit(&settings, &run_dir, resume, device, group)?;
    if crate::progress::quiet() {
        return Ok(match s.interrupted {
            true => crate::progress::interrupted_exit_code(),
            false => ExitCode::SUCCESS,
        });
    }
    if s.interrupted {
        crate::errln!(
            "interrupted: {} holds epoch {}; continue with: trainer fit --resume {}",
            run_dir.join(LAST).display(),
            s.epochs_done,
            run_dir.display()
        );
        return Ok(crate::progress::interrupted_exit_code());
    }
    crate::errln!(
        "done: {} epochs{}; best validation loss {}; checkpoints in {}, Keras weights in {}",
        s.epochs_done,
        match s.stopped {
            Some(_) => format!(" (stopped early, see {})", run_dir.join(STOPPED).display()),
            None => String::new(),
        },
        s.best_val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "- (no validation)".into()),
        run_dir.display(),
        settings.weights_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `--memory-format`: auto is channels-last on every device. Measured on a 2-core CPU at batch
/// 48: 23.5 images/s against 14.4 contiguous with the original augmentations (whose output is
/// already NHWC), 27.7 against 25.4 without; on CUDA it is what the tensor cores want.
fn channels_last(m: MemoryFormat) -> bool {
    m != MemoryFormat::Contiguous
}

/// Mistakes shown per label and kind on the report when `--review` is not given.
const REPORT_REVIEW: usize = 12;

/// `trainer eval`.
pub fn eval(args: EvalArgs) -> Result<ExitCode> {
    let device = args.device.resolve()?;
    let model = load_model(
        &args.weights,
        args.image_size,
        device,
        args.precision,
        args.engine,
    )?;
    let output = args.output.clone().unwrap_or_else(|| {
        args.weights
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf()
    });
    let opts = EvalOptions {
        weights: args.weights,
        data: args.data,
        split: args.split,
        output,
        threshold: args.threshold,
        calibrate: args.calibrate,
        in_place: args.in_place,
        review: args
            .review
            .unwrap_or(if args.report { REPORT_REVIEW } else { 0 }),
        batch_size: args.batch_size as usize,
    };
    let evaluation = eval::run(&model, &opts)?;
    let rep = &evaluation.report;
    eval::print_report(rep);
    if args.report {
        let pictures = [
            ("Precision-recall curves", opts.output.join("pr_curves.png")),
            ("Confusion", opts.output.join("confusion.png")),
        ];
        let page = crate::report::Page {
            labels: &model.taxonomy.labels,
            hierarchy: &crate::metrics::implied_parents(&model.taxonomy),
            data: &opts.data,
            pictures: &pictures,
            per_label: opts.review,
        };
        let path = opts.output.join("report.html");
        let shown = crate::report::write(&path, &evaluation, &page)?;
        crate::errln!("report: {} ({shown} thumbnails)", path.display());
    }
    crate::errln!(
        "wrote eval.json, eval.csv, pr_curves.png, confusion.png{}{} in {}",
        if opts.review > 0 { ", review.csv" } else { "" },
        if args.report { ", report.html" } else { "" },
        opts.output.display()
    );
    if let Some(path) = &rep.calibrated_checkpoint {
        crate::errln!("calibrated thresholds written to {path}; `trainer infer --weights {path}` applies them");
    }
    Ok(ExitCode::SUCCESS)
}

/// `trainer export`.
pub fn export(args: ExportArgs) -> Result<ExitCode> {
    let folder = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !folder.is_dir() {
        anyhow::bail!(
            "output folder {} does not exist (export writes one file into an existing folder)",
            folder.display()
        );
    }
    let mut model = load_for_inference(&args.weights, tch::Device::Cpu, args.image_size)?;
    // Weights become constants of the exported graph.
    model.vs.freeze();
    let meta = crate::model::onnx::Metadata {
        labels: &model.taxonomy.labels,
        thresholds: &model.thresholds,
        image_size: model.image_size,
        arch: model.net.config.arch,
    };
    match args.format {
        ExportFormat::Onnx => {
            let bytes = crate::model::onnx::export(&model.vs, &meta)?;
            crate::fsutil::write_atomic(&args.output, &bytes)?;
        }
        ExportFormat::Torchscript => crate::fsutil::write_atomic_path(&args.output, |tmp| {
            crate::model::torchscript::export(&model, &meta, tmp)
        })?,
    }
    crate::errln!(
        "exported {} as {:?} to {}: input images uint8 [N, {s}, {s}, 3] {}, output probabilities float32 [N, {}]",
        model.description,
        args.format,
        args.output.display(),
        crate::data::preprocess::CHANNEL_ORDER,
        model.taxonomy.labels.len(),
        s = model.image_size
    );
    Ok(ExitCode::SUCCESS)
}

/// `trainer fetch`.
pub fn fetch(args: FetchArgs) -> Result<ExitCode> {
    let client = Client::new(ClientOptions {
        jobs: args.jobs as usize,
        delay: std::time::Duration::from_millis(args.delay_ms),
        timeout: std::time::Duration::from_secs_f64(args.timeout),
        retries: args.retries,
        backoff: std::time::Duration::from_millis(args.backoff_ms),
    });
    let start = std::time::Instant::now();
    let s = match &args.metadata {
        Some(metadata) => fetch::fetch_metadata(
            &client,
            &MetadataFetch {
                metadata: metadata.clone(),
                out: args.out.clone(),
                iiif_base: args.iiif_base.clone(),
                height: args.height,
                limit: args.limit,
                labels: args.labels.clone(),
            },
        )?,
        None => fetch::fetch_tags(
            &client,
            &TagFetch {
                tags: args.tags.clone(),
                count: args.count,
                out: args.out.clone(),
                api_base: args.api_base.clone(),
                iiif_base: args.iiif_base.clone(),
                height: args.height,
                page_size: args.size,
                patience: args.patience,
            },
        )?,
    };
    crate::errln!(
        "fetch: saved {}, skipped {} (already on disk), failed {} in {:.1} s; log in {}",
        s.saved,
        s.skipped,
        s.failed,
        start.elapsed().as_secs_f64(),
        args.out.join("fetch.csv").display()
    );
    if s.interrupted {
        crate::errln!(
            "interrupted: only whole images were written; run the same command again to continue"
        );
        return Ok(crate::progress::interrupted_exit_code());
    }
    if s.short > 0 {
        crate::errln!(
            "fetch: {} tag(s) stopped short of --count {}",
            s.short,
            args.count
        );
    }
    Ok(if s.failed > 0 || s.short > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The `--recipe` preset with the options given on the command line in place of its values.
fn recipe_settings(args: &FitArgs) -> RecipeSettings {
    let preset = RecipeSettings::preset(args.recipe);
    RecipeSettings {
        preset: args.recipe,
        lr_schedule: args.lr_schedule.unwrap_or(preset.lr_schedule),
        warmup_epochs: args.warmup_epochs.unwrap_or(preset.warmup_epochs),
        ema: match args.ema {
            Some(d) if d > 0.0 => Some(d),
            Some(_) => None,
            None => preset.ema,
        },
        precise_bn: args.precise_bn.unwrap_or(preset.precise_bn),
        patience: args.patience.or(preset.patience),
        pos_weight: args.pos_weight.unwrap_or(preset.pos_weight),
        freeze_backbone_epochs: args
            .freeze_backbone_epochs
            .unwrap_or(preset.freeze_backbone_epochs),
    }
}

/// Makes this process one rank of the job: quiet unless rank 0, on `cuda:LOCAL_RANK` (or with its
/// share of the CPU cores), joined to the others. Returns its device and group.
fn join_job(
    job: &crate::dist::Job,
    device: tch::Device,
    timeout_s: u32,
) -> Result<(tch::Device, crate::dist::Group)> {
    if job.rank != 0 {
        crate::progress::set_quiet();
    }
    let device = match device.is_cuda() {
        true => tch::Device::Cuda(job.local_rank),
        false => {
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                // The machine's cores shared among the local ranks.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tch::set_num_threads((cores / job.local_world.max(1)).max(1) as i32);
            }
            device
        }
    };
    let group = crate::dist::Group::join(job, timeout_s, device.is_cuda())?;
    Ok((device, group))
}

/// `--cache-dir`: the folder given, none for `none`, else the per-user default.
fn image_cache_dir(arg: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    if let Some(dir) = arg {
        return (dir != std::path::Path::new("none")).then(|| dir.to_path_buf());
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let base = env("TRAINER_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("trainer")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/trainer")))?;
    Some(base.join("images"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The settings of `trainer fit ARGS` for a new run.
    fn settings(args: &[&str]) -> Result<FitSettings> {
        let cli = crate::cli::Cli::try_parse_from([&["trainer", "fit"], args].concat())?;
        match cli.command {
            crate::cli::Command::Fit(args) => new_run_settings(*args, tch::Device::Cpu),
            other => bail!("not fit: {other:?}"),
        }
    }

    #[test]
    fn the_image_size_defaults_to_the_variants_resolution() {
        for arch in crate::model::arch::Arch::ALL {
            let s = settings(&["--arch", arch.name()]).unwrap();
            assert_eq!(s.image_size, arch.coefficients().resolution, "{arch}");
            assert_eq!(s.arch, arch);
        }
        let s = settings(&["--arch", "efficientnet-b3", "--image-size", "64"]).unwrap();
        assert_eq!(s.image_size, 64);
        assert_eq!(settings(&[]).unwrap().image_size, 224);
    }

    #[test]
    fn loss_and_best_epoch_flags_resolve_into_the_settings() {
        let s = settings(&[]).unwrap();
        assert!(s.loss.is_default() && s.best_by.is_default());
        let s = settings(&[
            "--loss",
            "asl",
            "--asl-clip",
            "0.1",
            "--best-by",
            "macro_f1",
        ])
        .unwrap();
        assert_eq!(
            s.loss,
            Loss::Asl {
                gamma_neg: 4.0,
                gamma_pos: 1.0,
                clip: 0.1
            }
        );
        assert_eq!(s.best_by, crate::history::BestBy::MacroF1);
        let err = settings(&["--loss", "asl", "--gamma", "3"]).unwrap_err();
        assert!(err.to_string().contains("--gamma"), "{err}");
        // Settings a default run saves are those it always saved: no loss, best_by or arch.
        let saved = serde_json::to_value(settings(&[]).unwrap()).unwrap();
        for field in [
            "loss",
            "best_by",
            "arch",
            "tensorboard",
            "cache_dir",
            "cuda_graphs",
        ] {
            assert!(saved.get(field).is_none(), "{field} in {saved}");
        }
    }
}
