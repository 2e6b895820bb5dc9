//! Images from disk to model inputs.

pub mod decode;
pub mod taxonomy;
pub mod jpeg;
pub mod resize;
