//! `trainer fit`: the training loop, its optimizer and its run folder.

pub mod adam;
pub mod amp;
pub mod ddp;
pub mod fit;
pub mod kernels;
pub mod loss;
pub mod recipe;
pub mod shadow;
pub mod tensorboard;
