//! `trainer fit`: the training loop as named parts, its optimizer and its run folder.
//!
//! `settings` (resolved once) → `fit` (orchestration) → per epoch `step` (optimizer steps of
//! `learner`'s model, the loss from `loss`), `validate` (an [`crate::history::EpochRecord`]),
//! `saver` (checkpoints, best epoch, Keras weights) and `runlog` (results.csv, terminal,
//! TensorBoard), all in the folder `run_dir` describes.

pub mod adam;
pub mod amp;
pub mod ddp;
pub mod fit;
pub mod graph;
pub mod kernels;
pub mod learner;
pub mod loss;
pub mod recipe;
pub mod run_dir;
pub mod runlog;
pub mod saver;
pub mod settings;
pub mod shadow;
pub mod step;
pub mod tensorboard;
pub mod validate;
