//! What each subcommand does, from checked arguments to a printed summary.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::InferArgs;
use crate::device;
use crate::infer::{self, InferOptions};
use crate::model::load_for_inference;

/// `trainer infer`.
pub fn infer(args: InferArgs) -> Result<ExitCode> {
    let device = args.device.resolve()?;
    let model = load_for_inference(&args.weights, device)?;
    eprintln!("model: {}", model.description);
    let opts = InferOptions {
        input: args.input,
        output: args.output,
        threshold: args.threshold,
        batch_size: args.batch_size as usize,
    };
    let s = infer::run(&model, &opts)?;
    let rate = s.images_tagged as f64 / s.seconds.max(1e-9);
    eprintln!(
        "tagged {} images, skipped {}, {} JSON files in {} ({:.1} s, {:.1} images/s on {})",
        s.images_tagged,
        s.skipped.len(),
        s.folders_written,
        opts.output.display(),
        s.seconds,
        rate,
        device::describe(device)
    );
    if s.interrupted {
        eprintln!("interrupted: the JSON files written are complete; run the same command again to redo the rest");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}
