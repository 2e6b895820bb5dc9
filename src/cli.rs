//! Command-line interface: `trainer infer` (and the other subcommands as they land).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceArg;

/// Train, evaluate and run the NDL illustration tagger (EfficientNet-B0), compatible with the
/// original Keras scripts and their weights files.
#[derive(Debug, Parser)]
#[command(name = "trainer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tag folders of images and write one JSON file per folder (the original multiinference.py format).
    Infer(InferArgs),
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model weights: a Keras HDF5 file (the published weights_ndllabelimage.hdf5 or a
    /// weights_pdm_multi/*.hdf5 file).
    #[arg(long, short = 'w')]
    pub weights: PathBuf,
    /// Folder of images: each subfolder <PID>/ gives OUTPUT/<PID>.json; images directly inside go
    /// to a file named after the folder.
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// Folder for the JSON files (created if missing).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Report labels whose probability is above this (0 lists every label). Default: the
    /// model's own thresholds (0.4 for Keras files, as the original).
    #[arg(long, value_parser = parse_threshold)]
    pub threshold: Option<f32>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
}

fn parse_threshold(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("threshold {v} must be in [0, 1)"))
    }
}
