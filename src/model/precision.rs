//! Precision and memory order of the forward pass, shared by inference and training: autocast
//! in bf16 or fp16 on CPU or CUDA (through the C++ shim, src/shim/amp.cpp) and the channels-last
//! layout.

use std::ffi::c_int;

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Tensor};

extern "C" {
    fn trainer_autocast_enter(device: c_int, dtype: c_int, prev_dtype: *mut c_int) -> c_int;
    fn trainer_autocast_exit(device: c_int, prev: c_int, prev_dtype: c_int);
    fn trainer_autocast_state(device: c_int, dtype: *mut c_int) -> c_int;
}

/// Arithmetic precision of the forward pass, in inference and training (in training, batch-norm
/// statistics and the loss stay in fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Bf16,
    Fp16,
    Fp32,
}

impl Precision {
    /// bf16 on CUDA, fp32 on CPU.
    pub fn default_for(device: Device) -> Self {
        if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::Fp32
        }
    }
}

/// Autocast entered on one device type; leaving it (also when the closure panics) restores the
/// previous enabled state and dtype.
struct AutocastGuard {
    device: c_int,
    prev: c_int,
    prev_dtype: c_int,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: balances the enter that made this guard, on the same thread.
        unsafe { trainer_autocast_exit(self.device, self.prev, self.prev_dtype) };
    }
}

/// Runs `f` under autocast in `precision` on `device`'s type (nothing to do for fp32).
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    let dtype = match precision {
        Precision::Fp32 => return f(),
        Precision::Fp16 => 0,
        Precision::Bf16 => 1,
    };
    let dev = if device.is_cuda() { 1 } else { 0 };
    let mut prev_dtype = 0;
    // SAFETY: plain calls into libtorch's thread-local autocast state, balanced by the guard.
    let prev = unsafe { trainer_autocast_enter(dev, dtype, &mut prev_dtype) };
    let _guard = AutocastGuard {
        device: dev,
        prev,
        prev_dtype,
    };
    f()
}

/// Whether autocast is on for `device`'s type, and its dtype (0 float16, 1 bfloat16, 2 other).
pub fn autocast_state(device: Device) -> (bool, i32) {
    let mut dtype = 0;
    // SAFETY: a read of libtorch's thread-local autocast state.
    let on = unsafe { trainer_autocast_state(if device.is_cuda() { 1 } else { 0 }, &mut dtype) };
    (on != 0, dtype)
}

/// `x` in the run's memory order: channels-last, or plain contiguous NCHW.
pub fn layout(x: &Tensor, channels_last: bool) -> Tensor {
    if channels_last {
        self::channels_last(x)
    } else {
        x.contiguous()
    }
}

/// The same values in channels-last (NHWC) memory order, still indexed as NCHW.
pub fn channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A copy with channels-last strides, also for one channel (depthwise kernels), where a
/// permuted `contiguous()` keeps the NCHW strides and the kernels' gradients, which come back
/// channels-last, would not match their parameter's layout (DDP's reducer then copies them).
fn channels_last_strided(t: &Tensor) -> Tensor {
    let size = t.size();
    let (c, h, w) = (size[1], size[2], size[3]);
    let out = Tensor::empty_strided(&size, [c * h * w, 1, w * c, c], (t.kind(), t.device()));
    tch::no_grad(|| out.shallow_clone().copy_(t));
    out
}

/// Moves every 4-D variable (convolution kernels) of a VarStore to channels-last in place.
pub fn vars_to_channels_last(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = channels_last_strided(&v);
                v.set_data(&cl);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;
    use tch::{nn, Kind, Reduction};

    use crate::model::efficientnet::{Tagger, TaggerConfig};

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
