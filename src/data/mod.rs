//! Images from disk to model inputs.

pub mod augment;
pub mod dataset;
pub mod decode;
pub mod disk_cache;
pub mod jp2;
pub mod jpeg;
pub mod pnm;
pub mod preprocess;
pub mod resize;
pub mod split;
pub mod taxonomy;
pub mod tiff;
