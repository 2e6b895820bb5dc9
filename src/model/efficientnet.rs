//! EfficientNet-B0 (or another variant of [`super::arch`]) with the NDL tagger's head, laid out
//! exactly like the Keras original (`efficientnet` 1.1.1 `EfficientNetB0(include_top=False)` +
//! GlobalAveragePooling + Dense 512 + Dense 512 relu + Dense N sigmoid). The blocks come from
//! [`super::arch::Arch::network`].
//!
//! Every parameter lives in the `VarStore` under the Keras layer name (`stem_conv.weight`,
//! `block2a_expand_bn.running_mean`, `dense_2.bias`, ...), so importing and exporting Keras HDF5
//! files is a renaming of the last path component and a transposition.

use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::arch::{Arch, BlockSpec};

/// Keras defaults for `BatchNormalization`: epsilon 1e-3, momentum 0.99 (0.01 in torch terms).
pub const BN_EPS: f64 = 1e-3;
pub const BN_MOMENTUM: f64 = 0.01;
pub const HEAD_WIDTH: i64 = 512;

/// The architecture's free settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaggerConfig {
    /// Number of sigmoid outputs (labels).
    pub num_classes: i64,
    /// Drop-connect (stochastic depth) rate; block `i` uses `rate * i / 16` (see
    /// [`super::arch::Network::drop_rate`]).
    pub drop_connect: f64,
    /// The EfficientNet variant of the backbone.
    pub arch: Arch,
}

impl Default for TaggerConfig {
    fn default() -> Self {
        TaggerConfig {
            num_classes: 11,
            drop_connect: 0.2,
            arch: Arch::B0,
        }
    }
}

/// `tf.nn.swish`.
fn swish(x: &Tensor) -> Tensor {
    x.silu()
}

/// A convolution with TensorFlow's "same" padding. Stride 1 pads symmetrically inside the
/// convolution; larger strides pad explicitly, with the extra pixel after (right/bottom), as TF
/// does.
#[derive(Debug)]
pub struct SameConv {
    conv: nn::Conv2D,
    kernel: i64,
    stride: i64,
}

impl SameConv {
    fn new(
        p: nn::Path,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
        bias: bool,
    ) -> Self {
        let cfg = nn::ConvConfig {
            stride,
            padding: if stride == 1 { kernel / 2 } else { 0 },
            groups,
            bias,
            ..Default::default()
        };
        SameConv {
            conv: nn::conv2d(p, c_in, c_out, kernel, cfg),
            kernel,
            stride,
        }
    }
}

/// TF "same" padding of one spatial axis: (before, after).
pub fn same_padding(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let total = ((out - 1) * stride + kernel - size).max(0);
    (total / 2, total - total / 2)
}

impl Module for SameConv {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.stride == 1 {
            return xs.apply(&self.conv);
        }
        let size = xs.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        let (top, bottom) = same_padding(h, self.kernel, self.stride);
        let (left, right) = same_padding(w, self.kernel, self.stride);
        xs.constant_pad_nd([left, right, top, bottom])
            .apply(&self.conv)
    }
}

/// Batch-norm, or nothing once it was folded into the convolution before it.
fn norm(x: Tensor, bn: &nn::BatchNorm, folded: bool, train: bool) -> Tensor {
    if folded {
        x
    } else if train && x.numel() as i64 == x.size()[1] {
        one_value_norm(&x, bn)
    } else {
        x.apply_t(bn, train)
    }
}

/// A training-mode batch-norm over one value per channel (one image whose feature map is 1x1):
/// libtorch's unbiased running variance would divide by n - 1 = 0 and write NaN into the model.
/// Keras (TensorFlow's fused batch-norm) corrects by n / max(n - 1, 1) instead, so the batch
/// variance is 0: the output is beta, the running mean moves towards the value and the running
/// variance towards 0, as the original's training does.
fn one_value_norm(x: &Tensor, bn: &nn::BatchNorm) -> Tensor {
    let y = Tensor::batch_norm(
        x,
        bn.ws.as_ref(),
        bn.bs.as_ref(),
        None::<&Tensor>,
        None::<&Tensor>,
        true,
        BN_MOMENTUM,
        BN_EPS,
        false,
    );
    tch::no_grad(|| {
        let value = x.detach().to_kind(bn.running_mean.kind()).reshape([-1]);
        let mean = &bn.running_mean * (1.0 - BN_MOMENTUM) + value * BN_MOMENTUM;
        let var = &bn.running_var * (1.0 - BN_MOMENTUM);
        bn.running_mean.shallow_clone().copy_(&mean);
        bn.running_var.shallow_clone().copy_(&var);
    });
    y
}

/// Folds an evaluation-mode batch-norm into the convolution before it: the kernel is scaled per
/// output channel by gamma / sqrt(var + eps) and the bias becomes beta - mean * that scale. New
/// tensors replace the convolution's (the VarStore keeps the original ones), in the kernel's
/// memory order.
fn fold(conv: &mut SameConv, bn: &nn::BatchNorm) {
    tch::no_grad(|| {
        let scale = (&bn.running_var + BN_EPS).rsqrt();
        let scale = match &bn.ws {
            Some(gamma) => gamma * scale,
            None => scale,
        };
        let shift = -(&bn.running_mean * &scale);
        let shift = match &bn.bs {
            Some(beta) => shift + beta,
            None => shift,
        };
        let ws = &conv.conv.ws;
        let cl = ws.dim() == 4 && ws.stride()[1] == 1 && ws.size()[1] > 1;
        let folded = ws * scale.view([-1, 1, 1, 1]);
        conv.conv.ws = if cl {
            // Channels-last, still indexed as NCHW.
            folded
                .permute([0, 2, 3, 1])
                .contiguous()
                .permute([0, 3, 1, 2])
        } else {
            folded.contiguous()
        };
        conv.conv.bs = Some(match &conv.conv.bs {
            Some(b) => b * &scale + shift,
            None => shift,
        });
    });
}

fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        eps: BN_EPS,
        momentum: BN_MOMENTUM,
        ..Default::default()
    };
    nn::batch_norm2d(p, c, cfg)
}

/// The mobile inverted bottleneck block (`mb_conv_block`).
#[derive(Debug)]
pub struct MbConv {
    pub name: String,
    expand: Option<(SameConv, nn::BatchNorm)>,
    dwconv: SameConv,
    bn: nn::BatchNorm,
    se_reduce: SameConv,
    se_expand: SameConv,
    project_conv: SameConv,
    project_bn: nn::BatchNorm,
    residual: bool,
    drop_rate: f64,
    /// The batch-norms are folded into the convolutions (evaluation only).
    folded: bool,
}

impl MbConv {
    fn new(root: &nn::Path, spec: &BlockSpec, drop_rate: f64) -> Self {
        let name = spec.name.as_str();
        let (c_in, stride) = (spec.input_filters, spec.stride);
        let filters = spec.expanded_filters();
        let p = |suffix: &str| root / format!("{name}_{suffix}");
        let expand = (spec.expand_ratio != 1).then(|| {
            (
                SameConv::new(p("expand_conv"), c_in, filters, 1, 1, 1, false),
                batch_norm(p("expand_bn"), filters),
            )
        });
        let se_filters = spec.se_filters();
        MbConv {
            name: name.to_string(),
            expand,
            dwconv: SameConv::new(
                p("dwconv"),
                filters,
                filters,
                spec.kernel,
                stride,
                filters,
                false,
            ),
            bn: batch_norm(p("bn"), filters),
            se_reduce: SameConv::new(p("se_reduce"), filters, se_filters, 1, 1, 1, true),
            se_expand: SameConv::new(p("se_expand"), se_filters, filters, 1, 1, 1, true),
            project_conv: SameConv::new(
                p("project_conv"),
                filters,
                spec.output_filters,
                1,
                1,
                1,
                false,
            ),
            project_bn: batch_norm(p("project_bn"), spec.output_filters),
            residual: spec.residual(),
            drop_rate,
            folded: false,
        }
    }
}

/// Drop-connect as Keras writes it: `Dropout(rate, noise_shape=(None, 1, 1, 1))`, which keeps
/// each sample's residual branch with probability `1 - rate` and scales it by `1 / (1 - rate)`.
pub fn drop_connect(xs: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0.0 {
        return xs.shallow_clone();
    }
    let keep = 1.0 - rate;
    let n = xs.size()[0];
    // Drawn in fp32 as Keras does, also under bf16/fp16 autocast.
    let mask = Tensor::rand([n, 1, 1, 1], (tch::Kind::Float, xs.device()))
        .ge(rate)
        .to_kind(xs.kind());
    xs * mask / keep
}

impl MbConv {
    fn fold_batch_norms(&mut self) {
        if let Some((conv, bn)) = &mut self.expand {
            fold(conv, bn);
        }
        fold(&mut self.dwconv, &self.bn);
        fold(&mut self.project_conv, &self.project_bn);
        self.folded = true;
    }
}

impl ModuleT for MbConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let f = self.folded;
        let mut x = match &self.expand {
            Some((conv, bn)) => swish(&norm(xs.apply(conv), bn, f, train)),
            None => xs.shallow_clone(),
        };
        x = swish(&norm(x.apply(&self.dwconv), &self.bn, f, train));
        let se = x.adaptive_avg_pool2d([1, 1]);
        let se = swish(&se.apply(&self.se_reduce))
            .apply(&self.se_expand)
            .sigmoid();
        x = norm(
            (x * se).apply(&self.project_conv),
            &self.project_bn,
            f,
            train,
        );
        if self.residual {
            x = drop_connect(&x, self.drop_rate, train) + xs;
        }
        x
    }
}

/// EfficientNet backbone (B0 unless `config.arch` says otherwise) + the NDL head. `forward_t` returns logits; apply a sigmoid for the
/// probabilities the Keras model outputs.
#[derive(Debug)]
pub struct Tagger {
    pub config: TaggerConfig,
    stem_conv: SameConv,
    stem_bn: nn::BatchNorm,
    blocks: Vec<MbConv>,
    top_conv: SameConv,
    top_bn: nn::BatchNorm,
    dense: nn::Linear,
    dense_1: nn::Linear,
    dense_2: nn::Linear,
    folded: bool,
}

impl Tagger {
    pub fn new(root: &nn::Path, config: TaggerConfig) -> Self {
        let net = config.arch.network();
        let stem = net.stem_filters;
        let stem_conv = SameConv::new(root / "stem_conv", 3, stem, 3, 2, 1, false);
        let stem_bn = batch_norm(root / "stem_bn", stem);
        let blocks = net
            .blocks
            .iter()
            .map(|spec| MbConv::new(root, spec, net.drop_rate(config.drop_connect, spec)))
            .collect::<Vec<_>>();
        let last = net.blocks_output();
        let top = net.top_filters;
        let top_conv = SameConv::new(root / "top_conv", last, top, 1, 1, 1, false);
        let top_bn = batch_norm(root / "top_bn", top);
        let lin = Default::default();
        Tagger {
            config,
            stem_conv,
            stem_bn,
            blocks,
            top_conv,
            top_bn,
            dense: nn::linear(root / "dense", top, HEAD_WIDTH, lin),
            dense_1: nn::linear(root / "dense_1", HEAD_WIDTH, HEAD_WIDTH, lin),
            dense_2: nn::linear(root / "dense_2", HEAD_WIDTH, config.num_classes, lin),
            folded: false,
        }
    }

    /// For inference only: folds every batch-norm into the convolution before it, which saves
    /// one pass over each activation (the same outputs within float rounding). Training this
    /// model afterwards is an error.
    pub fn fold_batch_norms(&mut self) {
        if self.folded {
            return;
        }
        fold(&mut self.stem_conv, &self.stem_bn);
        for block in &mut self.blocks {
            block.fold_batch_norms();
        }
        fold(&mut self.top_conv, &self.top_bn);
        self.folded = true;
    }

    pub fn blocks(&self) -> &[MbConv] {
        &self.blocks
    }

    /// The pooled features of the backbone (1280 wide for B0: the top convolution's filters).
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        assert!(
            !(train && self.folded),
            "a model with folded batch-norms cannot train"
        );
        let f = self.folded;
        let mut x = swish(&norm(xs.apply(&self.stem_conv), &self.stem_bn, f, train));
        for block in &self.blocks {
            x = x.apply_t(block, train);
        }
        x = swish(&norm(x.apply(&self.top_conv), &self.top_bn, f, train));
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

impl Tagger {
    /// The head: logits from the pooled features.
    pub fn head(&self, features: &Tensor) -> Tensor {
        features
            .apply(&self.dense)
            .apply(&self.dense_1)
            .relu()
            .apply(&self.dense_2)
    }
}

impl ModuleT for Tagger {
    /// `xs`: float NCHW in [0, 1], BGR channel order. Returns logits (N, num_classes).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head(&self.features_t(xs, train))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(28, 5, 2), (1, 2));
        assert_eq!(same_padding(7, 3, 2), (1, 1));
        assert_eq!(same_padding(7, 5, 2), (2, 2));
        assert_eq!(same_padding(15, 3, 1), (1, 1));
    }

    #[test]
    fn block_names_follow_keras() {
        let names = Arch::B0.network().block_names();
        assert_eq!(names.len(), 16);
        assert_eq!(&names[..4], ["block1a", "block2a", "block2b", "block3a"]);
        assert_eq!(names[15], "block7a");
    }

    #[test]
    fn shapes_and_parameter_names() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = Tagger::new(&vs.root(), TaggerConfig::default());
        let vars = vs.variables();
        assert!(vars.contains_key("stem_conv.weight"));
        assert!(vars.contains_key("block1a_se_reduce.bias"));
        assert!(!vars.contains_key("block1a_expand_conv.weight"));
        assert_eq!(vars["block2a_se_reduce.weight"].size(), [4, 96, 1, 1]);
        assert_eq!(vars["block6d_dwconv.weight"].size(), [1152, 1, 5, 5]);
        assert_eq!(vars["dense_2.weight"].size(), [11, 512]);
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        // EfficientNet-B0 without top (4,007,548 trainable) + 1280*512+512 + 512*512+512 + 512*11+11.
        assert_eq!(trainable, 4_007_548 + 655_872 + 262_656 + 5_643);
        let out = tch::no_grad(|| {
            model.forward_t(&Tensor::zeros([2, 3, 64, 48], tch::kind::FLOAT_CPU), false)
        });
        assert_eq!(out.size(), [2, 11]);
    }

    #[test]
    fn one_value_per_channel_gives_keras_statistics_not_nan() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let bn = batch_norm(vs.root() / "bn", 3);
        tch::no_grad(|| {
            let _ = bn.running_var.shallow_clone().fill_(2.0);
            let _ = bn.running_mean.shallow_clone().fill_(1.0);
        });
        let x = Tensor::from_slice(&[5.0f32, -3.0, 0.5]).view([1, 3, 1, 1]);
        let y = norm(x.shallow_clone(), &bn, false, true);
        let beta = bn.bs.as_ref().map(|b| b.view([1, 3, 1, 1])).unwrap();
        assert!(y.allclose(&beta, 1e-5, 1e-5, false), "{y}");
        let mean = Vec::<f32>::try_from(&bn.running_mean).unwrap();
        let var = Vec::<f32>::try_from(&bn.running_var).unwrap();
        for (m, v) in [5.0f32, -3.0, 0.5].iter().zip(&mean) {
            assert!((v - (0.99 + 0.01 * m)).abs() < 1e-6, "{mean:?}");
        }
        assert!(var.iter().all(|v| (v - 1.98).abs() < 1e-6), "{var:?}");
        // Two values per channel take libtorch's own path (unbiased running variance).
        let x2 = Tensor::from_slice(&[1.0f32, 3.0, 0.0, 0.0, 2.0, 2.0]).view([2, 3, 1, 1]);
        let _ = norm(x2, &bn, false, true);
        let var = Vec::<f32>::try_from(&bn.running_var).unwrap();
        assert!(
            (var[2] - (1.98 * 0.99 + 0.01 * 2.0)).abs() < 1e-5,
            "{var:?}"
        );
    }

    #[test]
    fn folded_batch_norms_give_the_same_outputs() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut model = Tagger::new(&vs.root(), TaggerConfig::default());
        // Batch-norm statistics and affine parameters far from the identity.
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("running_var") {
                    v.copy_(&(v.rand_like() + 0.5));
                } else if name.contains("running_mean") || name.contains("bn.bias") {
                    v.copy_(&(v.rand_like() - 0.5));
                } else if name.contains("bn.weight") {
                    v.copy_(&(v.rand_like() + 0.5));
                }
            }
        });
        let x = Tensor::rand([3, 3, 64, 48], tch::kind::FLOAT_CPU);
        let before = tch::no_grad(|| model.forward_t(&x, false));
        model.fold_batch_norms();
        let after = tch::no_grad(|| model.forward_t(&x, false));
        let diff = (&before - &after).abs().max().double_value(&[]);
        let scale = before.abs().max().double_value(&[]);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{diff} (outputs up to {scale})"
        );
    }

    #[test]
    fn drop_connect_keeps_whole_samples_and_rescales() {
        tch::manual_seed(3);
        let x = Tensor::ones([64, 2, 3, 3], tch::kind::FLOAT_CPU);
        let y = drop_connect(&x, 0.25, true);
        let per_sample = y.sum_dim_intlist([1, 2, 3].as_slice(), false, tch::Kind::Float);
        for v in Vec::<f32>::try_from(&per_sample).unwrap() {
            assert!(v == 0.0 || (v - 18.0 / 0.75).abs() < 1e-4, "{v}");
        }
        assert!(drop_connect(&x, 0.25, false).equal(&x));
    }
}
