//! `trainer`: train, evaluate and run the NDL illustration tagger (EfficientNet-B0), compatible
//! with the original Keras scripts.
//!
//! Lines go out through `errln!`/`outln!`, never `eprintln!`/`println!`, which panic when the
//! terminal or pipe has gone (clippy enforces it).
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
pub mod commands;
pub mod csvfile;
pub mod data;
pub mod device;
pub mod dist;
pub mod doctor;
pub mod eval;
pub mod fetch;
pub mod fsutil;
pub mod gpu;
pub mod history;
pub mod infer;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod plots;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod train;
