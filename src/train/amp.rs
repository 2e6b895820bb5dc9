//! Mixed precision in training: autocast and the channels-last layout (which live in
//! `model::precision`, re-exported here) and fp16 dynamic loss scaling.

use anyhow::Result;
use tch::Tensor;

use super::kernels::unscale_and_check;
pub use crate::model::precision::{
    autocast, autocast_state, channels_last, layout, vars_to_channels_last, Precision,
};

/// Dynamic loss scaling for fp16: the loss is multiplied by `scale` before backward, gradients are
/// unscaled before the step; a step with non-finite gradients is skipped and the scale halved,
/// and the scale doubles after 2000 good steps (as PyTorch's GradScaler).
pub struct LossScaler {
    pub scale: f64,
    good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    /// The backward pass of the scaled loss.
    pub fn backward(&self, loss: &Tensor) -> Result<(), tch::TchError> {
        (loss * self.scale).f_backward()
    }

    /// Unscales the gradients and says whether the step may be taken (they are all finite);
    /// adapts the scale.
    pub fn unscale(&mut self, grads: &[Tensor]) -> Result<bool> {
        let refs: Vec<&Tensor> = grads.iter().collect();
        let finite = !unscale_and_check(&refs, 1.0 / self.scale)?;
        if finite {
            self.good_steps += 1;
            if self.good_steps >= 2000 {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good_steps = 0;
        }
        Ok(finite)
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    #[test]
    fn autocast_restores_the_previous_state_and_dtype_even_after_a_panic() {
        let dev = Device::Cpu;
        let before = autocast_state(dev);
        autocast(Precision::Bf16, dev, || {
            assert_eq!(autocast_state(dev), (true, 1));
            autocast(Precision::Fp16, dev, || {
                assert_eq!(autocast_state(dev), (true, 0))
            });
            assert_eq!(
                autocast_state(dev),
                (true, 1),
                "the inner exit restored bf16"
            );
        });
        assert_eq!(autocast_state(dev), before);
        let r = std::panic::catch_unwind(|| autocast(Precision::Bf16, dev, || panic!("boom")));
        assert!(r.is_err());
        assert_eq!(autocast_state(dev), before, "a panic left autocast on");
    }

    #[test]
    fn unscaling_finds_non_finite_gradients_in_one_call() {
        let a = Tensor::from_slice(&[2.0f32, 4.0]);
        let b = Tensor::from_slice(&[8.0f32]);
        assert!(!unscale_and_check(&[&a, &b], 0.5).unwrap());
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [4.0]);
        let c = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(unscale_and_check(&[&a, &c], 1.0).unwrap());
        let d = Tensor::from_slice(&[f32::NAN]);
        assert!(unscale_and_check(&[&d], 1.0).unwrap());
    }

    #[test]
    fn contiguous_means_nchw_and_channels_last_means_nhwc() {
        let pixels = Tensor::zeros([2, 8, 6, 3], (tch::Kind::Uint8, Device::Cpu));
        let x = crate::data::preprocess::to_input(&pixels);
        assert!(layout(&x, false).is_contiguous());
        assert_eq!(layout(&x, true).stride(), [144, 1, 18, 3]);
    }

    #[test]
    fn drop_connect_masks_are_drawn_in_fp32_under_autocast() {
        // The same seed keeps the same samples in bf16 as in fp32. libtorch's generator is
        // process-wide and other tests draw from it concurrently, so a race may spoil one try.
        let x = Tensor::ones([64, 2, 1, 1], tch::kind::FLOAT_CPU);
        let same = (0..5).any(|_| {
            tch::manual_seed(9);
            let full = crate::model::efficientnet::drop_connect(&x, 0.3, true).ne(0.0);
            tch::manual_seed(9);
            let half = crate::model::efficientnet::drop_connect(
                &x.to_kind(tch::Kind::BFloat16),
                0.3,
                true,
            )
            .ne(0.0);
            full.equal(&half)
        });
        assert!(same, "bf16 and fp32 keep different samples");
    }

    use super::*;
    use tch::nn::ModuleT;
    use tch::{nn, Kind, Reduction};

    use crate::model::efficientnet::{Tagger, TaggerConfig};

    #[test]
    fn channels_last_gives_the_same_outputs() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Tagger::new(&vs.root(), TaggerConfig::default());
        let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let a = tch::no_grad(|| net.forward_t(&x, false));
        vars_to_channels_last(&vs);
        let w = &vs.variables()["stem_conv.weight"];
        assert!(!w.is_contiguous(), "conv kernels are channels-last");
        let b = tch::no_grad(|| net.forward_t(&channels_last(&x), false));
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{diff}");
    }

    #[test]
    fn bf16_and_fp32_steps_give_close_losses() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Tagger::new(&vs.root(), TaggerConfig::default());
        let x = Tensor::rand([4, 3, 64, 64], (Kind::Float, Device::Cpu));
        let y = Tensor::rand([4, 11], (Kind::Float, Device::Cpu)).round();
        let loss = |p: Precision| {
            let logits = autocast(p, Device::Cpu, || net.forward_t(&x, false));
            logits
                .to_kind(Kind::Float)
                .binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean)
                .double_value(&[])
        };
        let (full, half) = (loss(Precision::Fp32), loss(Precision::Bf16));
        let logits_kind =
            autocast(Precision::Bf16, Device::Cpu, || net.forward_t(&x, false)).kind();
        assert_eq!(logits_kind, Kind::BFloat16, "autocast is active");
        assert!((full - half).abs() < 1e-2, "fp32 {full} vs bf16 {half}");
        // Gradients flow in bf16 too.
        let logits = autocast(Precision::Bf16, Device::Cpu, || net.forward_t(&x, true));
        let l = logits
            .to_kind(Kind::Float)
            .binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean);
        l.backward();
        assert!(vs.variables()["stem_conv.weight"].grad().defined());
    }
}
