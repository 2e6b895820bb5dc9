//! The EfficientNet variants B0 to B7 as data: the one description of each network's blocks,
//! filters, repeats, kernel sizes and resolution. The network ([`super::efficientnet::Tagger`]),
//! the Keras layer names ([`super::keras`]) and the ONNX graph ([`super::onnx`]) are all built
//! from [`Arch::network`]; nothing else walks the stages.
//!
//! The rules are those of the `efficientnet` 1.1.1 package (`efficientnet/model.py`) that built
//! the original Keras models: B0's `DEFAULT_BLOCKS_ARGS` scaled by `round_filters` (depth
//! divisor 8) and `round_repeats`, blocks named `block{stage}{letter}`.

use std::fmt;
use std::str::FromStr;

/// One EfficientNet variant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Arch {
    #[default]
    B0,
    B1,
    B2,
    B3,
    B4,
    B5,
    B6,
    B7,
}

/// The scaling of a variant, as `EfficientNetB0()`..`EfficientNetB7()` pass them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coefficients {
    /// Multiplier of every layer's filters (`width_coefficient`).
    pub width: f64,
    /// Multiplier of every stage's repeats (`depth_coefficient`).
    pub depth: f64,
    /// The input size the variant was designed for (`default_resolution`).
    pub resolution: usize,
    /// The dropout before Keras' own classifier (`dropout_rate`; unused without the top).
    pub dropout: f64,
}

/// One stage of B0 (`BlockArgs` of `DEFAULT_BLOCKS_ARGS`); `id_skip` is true everywhere.
struct Stage {
    kernel: i64,
    repeats: usize,
    input_filters: i64,
    output_filters: i64,
    expand_ratio: i64,
    stride: i64,
    se_ratio: f64,
}

const fn stage(k: i64, r: usize, i: i64, o: i64, e: i64, s: i64) -> Stage {
    Stage {
        kernel: k,
        repeats: r,
        input_filters: i,
        output_filters: o,
        expand_ratio: e,
        stride: s,
        se_ratio: 0.25,
    }
}

/// B0's seven stages: (kernel, repeats, in, out, expand, stride), SE ratio 0.25.
const BASE_STAGES: [Stage; 7] = [
    stage(3, 1, 32, 16, 1, 1),
    stage(3, 2, 16, 24, 6, 2),
    stage(5, 2, 24, 40, 6, 2),
    stage(3, 3, 40, 80, 6, 2),
    stage(5, 3, 80, 112, 6, 1),
    stage(5, 4, 112, 192, 6, 2),
    stage(3, 1, 192, 320, 6, 1),
];
const BASE_STEM_FILTERS: i64 = 32;
const BASE_TOP_FILTERS: i64 = 1280;
const DEPTH_DIVISOR: i64 = 8;

/// One mobile inverted bottleneck block, with the values the Keras package gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    /// The Keras layer-name prefix: `block1a`, `block2a`, `block2b`, ...
    pub name: String,
    pub kernel: i64,
    pub stride: i64,
    pub input_filters: i64,
    pub output_filters: i64,
    pub expand_ratio: i64,
    pub se_ratio: f64,
    /// Position among all blocks (0 first), for the drop-connect rate.
    pub index: usize,
}

impl BlockSpec {
    /// Channels after the expansion (the depthwise convolution's width).
    pub fn expanded_filters(&self) -> i64 {
        self.input_filters * self.expand_ratio
    }

    /// Channels of the squeeze-and-excitation bottleneck: `max(1, int(input_filters * se_ratio))`.
    pub fn se_filters(&self) -> i64 {
        ((self.input_filters as f64 * self.se_ratio) as i64).max(1)
    }

    /// Whether the block adds its input to its output (Keras: `id_skip`, stride 1, same width).
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.input_filters == self.output_filters
    }
}

/// A variant's whole backbone: stem, blocks and top.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    pub arch: Arch,
    pub stem_filters: i64,
    pub blocks: Vec<BlockSpec>,
    pub top_filters: i64,
    /// The divisor of the drop-connect rates: the package divides by B0's block count (16, the
    /// sum of the unscaled repeats) for every variant.
    pub drop_connect_total: usize,
}

impl Network {
    /// A block's drop-connect rate for the model's rate `rate`: `rate * index / total`, as the
    /// package computes it (so above `rate` for the last blocks of B1..B7).
    pub fn drop_rate(&self, rate: f64, block: &BlockSpec) -> f64 {
        rate * block.index as f64 / self.drop_connect_total as f64
    }

    /// The channels the last block gives the top convolution.
    pub fn blocks_output(&self) -> i64 {
        self.blocks
            .last()
            .map_or(self.stem_filters, |b| b.output_filters)
    }

    /// The blocks' Keras names in order.
    pub fn block_names(&self) -> Vec<String> {
        self.blocks.iter().map(|b| b.name.clone()).collect()
    }
}

/// `round_filters`: the filters times the width, to a multiple of 8 (at least 8), never more
/// than 10% below the product.
fn round_filters(filters: i64, width: f64) -> i64 {
    let scaled = filters as f64 * width;
    let divisor = DEPTH_DIVISOR as f64;
    let mut new =
        ((scaled + divisor / 2.0) as i64 / DEPTH_DIVISOR * DEPTH_DIVISOR).max(DEPTH_DIVISOR);
    if (new as f64) < 0.9 * scaled {
        new += DEPTH_DIVISOR;
    }
    new
}

/// `round_repeats`: the repeats times the depth, rounded up.
fn round_repeats(repeats: usize, depth: f64) -> usize {
    (depth * repeats as f64).ceil() as usize
}

impl Arch {
    pub const ALL: [Arch; 8] = [
        Arch::B0,
        Arch::B1,
        Arch::B2,
        Arch::B3,
        Arch::B4,
        Arch::B5,
        Arch::B6,
        Arch::B7,
    ];

    /// The Keras model name: `efficientnet-b0`, ...
    pub fn name(self) -> &'static str {
        match self {
            Arch::B0 => "efficientnet-b0",
            Arch::B1 => "efficientnet-b1",
            Arch::B2 => "efficientnet-b2",
            Arch::B3 => "efficientnet-b3",
            Arch::B4 => "efficientnet-b4",
            Arch::B5 => "efficientnet-b5",
            Arch::B6 => "efficientnet-b6",
            Arch::B7 => "efficientnet-b7",
        }
    }

    pub fn coefficients(self) -> Coefficients {
        let (width, depth, resolution, dropout) = match self {
            Arch::B0 => (1.0, 1.0, 224, 0.2),
            Arch::B1 => (1.0, 1.1, 240, 0.2),
            Arch::B2 => (1.1, 1.2, 260, 0.3),
            Arch::B3 => (1.2, 1.4, 300, 0.3),
            Arch::B4 => (1.4, 1.8, 380, 0.4),
            Arch::B5 => (1.6, 2.2, 456, 0.4),
            Arch::B6 => (1.8, 2.6, 528, 0.5),
            Arch::B7 => (2.0, 3.1, 600, 0.5),
        };
        Coefficients {
            width,
            depth,
            resolution,
            dropout,
        }
    }

    /// The variant's backbone, block by block, as the package's `EfficientNet()` builds it: each
    /// stage's filters and repeats scaled; the first block of a stage takes the stage's input
    /// filters and stride, the others its output filters and stride 1.
    pub fn network(self) -> Network {
        let c = self.coefficients();
        let mut blocks = Vec::new();
        for (s, stage) in BASE_STAGES.iter().enumerate() {
            let input_filters = round_filters(stage.input_filters, c.width);
            let output_filters = round_filters(stage.output_filters, c.width);
            for r in 0..round_repeats(stage.repeats, c.depth) {
                let first = r == 0;
                blocks.push(BlockSpec {
                    name: format!("block{}{}", s + 1, (b'a' + r as u8) as char),
                    kernel: stage.kernel,
                    stride: if first { stage.stride } else { 1 },
                    input_filters: if first { input_filters } else { output_filters },
                    output_filters,
                    expand_ratio: stage.expand_ratio,
                    se_ratio: stage.se_ratio,
                    index: blocks.len(),
                });
            }
        }
        Network {
            arch: self,
            stem_filters: round_filters(BASE_STEM_FILTERS, c.width),
            blocks,
            top_filters: round_filters(BASE_TOP_FILTERS, c.width),
            drop_connect_total: BASE_STAGES.iter().map(|s| s.repeats).sum(),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Arch {
    /// True for B0, the default (a B0 checkpoint and its settings do not record the arch).
    pub fn is_b0(&self) -> bool {
        *self == Arch::B0
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    /// The name, through [`Arch::from_str`]; an unknown one is an error listing the known.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Arch {
    type Err = String;

    /// `efficientnet-b0` .. `efficientnet-b7`.
    fn from_str(s: &str) -> Result<Self, String> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
                format!("unknown architecture {s:?} (known: {})", known.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Keras builds, per variant: stem and top filters, then per stage the repeats, the
    /// output filters, the kernel and the first block's stride, the last block's name and every
    /// block's SE width. Written out from running the package's own `EfficientNetB0()` ..
    /// `EfficientNetB7(include_top=False)` with its layers recorded.
    struct Expected {
        stem: i64,
        top: i64,
        repeats: [usize; 7],
        out: [i64; 7],
        kernel: [i64; 7],
        stride: [i64; 7],
        last: &'static str,
        se: &'static [i64],
    }

    #[rustfmt::skip]
    fn expected(arch: Arch) -> Expected {
        match arch {
            Arch::B0 => Expected { stem: 32, top: 1280, repeats: [1, 2, 2, 3, 3, 4, 1], out: [16, 24, 40, 80, 112, 192, 320], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7a", se: &[8, 4, 6, 6, 10, 10, 20, 20, 20, 28, 28, 28, 48, 48, 48, 48] },
            Arch::B1 => Expected { stem: 32, top: 1280, repeats: [2, 3, 3, 4, 4, 5, 2], out: [16, 24, 40, 80, 112, 192, 320], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7b", se: &[8, 4, 4, 6, 6, 6, 10, 10, 10, 20, 20, 20, 20, 28, 28, 28, 28, 48, 48, 48, 48, 48, 80] },
            Arch::B2 => Expected { stem: 32, top: 1408, repeats: [2, 3, 3, 4, 4, 5, 2], out: [16, 24, 48, 88, 120, 208, 352], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7b", se: &[8, 4, 4, 6, 6, 6, 12, 12, 12, 22, 22, 22, 22, 30, 30, 30, 30, 52, 52, 52, 52, 52, 88] },
            Arch::B3 => Expected { stem: 40, top: 1536, repeats: [2, 3, 3, 5, 5, 6, 2], out: [24, 32, 48, 96, 136, 232, 384], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7b", se: &[10, 6, 6, 8, 8, 8, 12, 12, 12, 24, 24, 24, 24, 24, 34, 34, 34, 34, 34, 58, 58, 58, 58, 58, 58, 96] },
            Arch::B4 => Expected { stem: 48, top: 1792, repeats: [2, 4, 4, 6, 6, 8, 2], out: [24, 32, 56, 112, 160, 272, 448], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7b", se: &[12, 6, 6, 8, 8, 8, 8, 14, 14, 14, 14, 28, 28, 28, 28, 28, 28, 40, 40, 40, 40, 40, 40, 68, 68, 68, 68, 68, 68, 68, 68, 112] },
            Arch::B5 => Expected { stem: 48, top: 2048, repeats: [3, 5, 5, 7, 7, 9, 3], out: [24, 40, 64, 128, 176, 304, 512], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7c", se: &[12, 6, 6, 6, 10, 10, 10, 10, 10, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 32, 44, 44, 44, 44, 44, 44, 44, 76, 76, 76, 76, 76, 76, 76, 76, 76, 128, 128] },
            Arch::B6 => Expected { stem: 56, top: 2304, repeats: [3, 6, 6, 8, 8, 11, 3], out: [32, 40, 72, 144, 200, 344, 576], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7c", se: &[14, 8, 8, 8, 10, 10, 10, 10, 10, 10, 18, 18, 18, 18, 18, 18, 36, 36, 36, 36, 36, 36, 36, 36, 50, 50, 50, 50, 50, 50, 50, 50, 86, 86, 86, 86, 86, 86, 86, 86, 86, 86, 86, 144, 144] },
            Arch::B7 => Expected { stem: 64, top: 2560, repeats: [4, 7, 7, 10, 10, 13, 4], out: [32, 48, 80, 160, 224, 384, 640], kernel: [3, 3, 5, 3, 5, 5, 3], stride: [1, 2, 2, 2, 1, 2, 1], last: "block7d", se: &[16, 8, 8, 8, 8, 12, 12, 12, 12, 12, 12, 12, 20, 20, 20, 20, 20, 20, 20, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 56, 56, 56, 56, 56, 56, 56, 56, 56, 56, 96, 96, 96, 96, 96, 96, 96, 96, 96, 96, 96, 96, 96, 160, 160, 160] },
        }
    }

    /// The blocks of each stage (stage number from the name's digit).
    fn stages(net: &Network) -> Vec<Vec<&BlockSpec>> {
        let mut stages: Vec<Vec<&BlockSpec>> = vec![Vec::new(); 7];
        for b in &net.blocks {
            let digit = b.name.as_bytes()[5] - b'1';
            stages[digit as usize].push(b);
        }
        stages
    }

    #[test]
    fn every_variant_is_what_keras_builds() {
        for arch in Arch::ALL {
            let net = arch.network();
            let want = expected(arch);
            assert_eq!(
                (net.stem_filters, net.top_filters),
                (want.stem, want.top),
                "{arch}"
            );
            let stages = stages(&net);
            let repeats: Vec<usize> = stages.iter().map(|s| s.len()).collect();
            assert_eq!(repeats, want.repeats, "{arch}");
            assert_eq!(
                net.blocks.len(),
                want.repeats.iter().sum::<usize>(),
                "{arch}"
            );
            assert_eq!(net.blocks.last().map(|b| b.name.as_str()), Some(want.last));
            let se: Vec<i64> = net.blocks.iter().map(|b| b.se_filters()).collect();
            assert_eq!(se, want.se, "{arch}");
            let mut c_in = net.stem_filters;
            for (s, blocks) in stages.iter().enumerate() {
                for (r, b) in blocks.iter().enumerate() {
                    let letter = (b'a' + r as u8) as char;
                    assert_eq!(b.name, format!("block{}{letter}", s + 1), "{arch}");
                    assert_eq!(b.output_filters, want.out[s], "{arch} {}", b.name);
                    assert_eq!(b.kernel, want.kernel[s], "{arch} {}", b.name);
                    let stride = if r == 0 { want.stride[s] } else { 1 };
                    assert_eq!(b.stride, stride, "{arch} {}", b.name);
                    assert_eq!(b.input_filters, c_in, "{arch} {}", b.name);
                    // Keras: a residual add (and a drop layer) in every block but a stage's first.
                    assert_eq!(b.residual(), r > 0, "{arch} {}", b.name);
                    c_in = b.output_filters;
                }
            }
            let indices: Vec<usize> = net.blocks.iter().map(|b| b.index).collect();
            assert_eq!(indices, (0..net.blocks.len()).collect::<Vec<_>>());
            assert_eq!(net.drop_connect_total, 16, "{arch}");
        }
    }

    #[test]
    fn b0_is_the_original_network() {
        let net = Arch::B0.network();
        assert_eq!(net.blocks.len(), 16);
        let stages = stages(&net);
        let first =
            |f: fn(&BlockSpec) -> i64| -> Vec<i64> { stages.iter().map(|s| f(s[0])).collect() };
        assert_eq!(first(|b| b.output_filters), [16, 24, 40, 80, 112, 192, 320]);
        assert_eq!(first(|b| b.input_filters), [32, 16, 24, 40, 80, 112, 192]);
        assert_eq!(
            stages.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [1, 2, 2, 3, 3, 4, 1]
        );
        assert_eq!(first(|b| b.kernel), [3, 3, 5, 3, 5, 5, 3]);
        assert_eq!(first(|b| b.stride), [1, 2, 2, 2, 1, 2, 1]);
        assert_eq!(first(|b| b.expand_ratio), [1, 6, 6, 6, 6, 6, 6]);
        assert!(net.blocks.iter().all(|b| b.se_ratio == 0.25));
        assert_eq!((net.stem_filters, net.top_filters), (32, 1280));
        assert_eq!(
            &net.block_names()[..4],
            ["block1a", "block2a", "block2b", "block3a"]
        );
        // Block i of 16 drops with rate * i / 16.
        assert_eq!(net.drop_rate(0.2, &net.blocks[0]), 0.0);
        assert_eq!(net.drop_rate(0.2, &net.blocks[15]), 0.2 * 15.0 / 16.0);
    }

    #[test]
    fn drop_connect_rates_divide_by_b0s_block_count() {
        // The package's Dropout of block7b in B1 (index 22 of 23) has rate 0.275 = 0.2 * 22 / 16.
        let net = Arch::B1.network();
        let last = &net.blocks[22];
        assert_eq!(last.name, "block7b");
        assert!((net.drop_rate(0.2, last) - 0.275).abs() < 1e-12);
    }

    #[test]
    fn names_and_coefficients() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
        }
        assert_eq!(Arch::default(), Arch::B0);
        assert_eq!(Arch::B3.to_string(), "efficientnet-b3");
        let err = "efficientnet-b8".parse::<Arch>().unwrap_err();
        assert!(
            err.contains("efficientnet-b8") && err.contains("efficientnet-b7"),
            "{err}"
        );
        assert!("B0".parse::<Arch>().is_err());
        let c = Arch::B5.coefficients();
        assert_eq!(
            (c.width, c.depth, c.resolution, c.dropout),
            (1.6, 2.2, 456, 0.4)
        );
        let c = Arch::B0.coefficients();
        assert_eq!(
            (c.width, c.depth, c.resolution, c.dropout),
            (1.0, 1.0, 224, 0.2)
        );
    }

    /// A file of the shared fixtures (`TRAINER_SHARED` or `../shared`).
    fn fixture(path: &str) -> std::path::PathBuf {
        std::env::var_os("TRAINER_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
            .join("fixtures")
            .join(path)
    }

    /// The Keras-written B1 tagger.
    fn keras_b1_file() -> std::path::PathBuf {
        fixture("keras-oracle-b1/ndl_b1_weights.h5")
    }

    /// The `layer_names` of a weights file Keras wrote with `model.save_weights`.
    fn written_layer_names(path: &std::path::Path) -> Vec<String> {
        let file = hdf5::File::open(path).expect("the fixture opens");
        let attr = file.attr("layer_names").expect("layer_names");
        crate::model::hdf5_safe::read_names(&attr).expect("names")
    }

    #[test]
    fn b0_layer_names_are_those_keras_writes() {
        let written = written_layer_names(&fixture("keras-oracle/ndl_b0_weights.h5"));
        assert_eq!(super::super::keras::original_layer_names(Arch::B0), written);
    }

    #[test]
    fn b1_layer_names_are_those_keras_writes() {
        let written = written_layer_names(&keras_b1_file());
        assert_eq!(super::super::keras::original_layer_names(Arch::B1), written);
        assert_ne!(super::super::keras::original_layer_names(Arch::B0), written);
    }

    #[test]
    fn b1_tagger_takes_every_tensor_of_a_keras_b1_file() {
        use super::super::efficientnet::{Tagger, TaggerConfig};
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let config = TaggerConfig {
            num_classes: 11,
            arch: Arch::B1,
            ..Default::default()
        };
        let net = Tagger::new(&vs.root(), config);
        let report =
            super::super::keras::load(&keras_b1_file(), &vs, Arch::B1).expect("the B1 file loads");
        assert!(report.head_loaded);
        assert_eq!(report.applied, vs.variables().len());
        assert!(report.renamed.is_empty());
        // Keras's probabilities for the first 8 oracle inputs (240x240 BGR), within 1e-4.
        let dir = fixture("keras-oracle-b1");
        let inputs = tch::Tensor::read_npy(dir.join("inputs_240_bgr_u8.npy")).expect("inputs");
        let expected = tch::Tensor::read_npy(dir.join("probs.npy")).expect("probs");
        let x = crate::data::preprocess::to_input(&inputs.narrow(0, 0, 8));
        let probs = tch::no_grad(|| tch::nn::ModuleT::forward_t(&net, &x, false).sigmoid());
        let diff = (probs - expected.narrow(0, 0, 8))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "B1 differs from Keras by {diff:e}");
        // The same file does not fit B0.
        let b0 = tch::nn::VarStore::new(tch::Device::Cpu);
        let _net = Tagger::new(
            &b0.root(),
            TaggerConfig {
                num_classes: 11,
                ..Default::default()
            },
        );
        let err = super::super::keras::load(&keras_b1_file(), &b0, Arch::B0).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds efficientnet-b1 weights, not efficientnet-b0"),
            "{err}"
        );
    }
}
