//! The network, its Keras weights and our checkpoints.

pub mod efficientnet;
pub mod keras;
