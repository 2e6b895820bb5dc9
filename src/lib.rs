//! `trainer`: train, evaluate and run the NDL illustration tagger (EfficientNet-B0).

pub mod data;
pub mod model;
