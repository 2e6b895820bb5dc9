//! Speed paths of training, through a small C++ shim (src/shim/amp.cpp) for what tch does not
//! bind: multi-tensor (`_foreach_*`), fused and capturable Adam, gradients set to none, fp16 loss
//! scaling (autocast and the channels-last layout live in `model::precision`, re-exported here).
//! Each has a plain fallback and is checked against it by the tests.

use std::ffi::{c_char, c_double, c_int, CStr};

use anyhow::{bail, Result};
use tch::Tensor;

pub use crate::model::precision::{
    autocast, autocast_state, channels_last, layout, vars_to_channels_last, Precision,
};

extern "C" {
    fn trainer_grads_to_none(params: *const *const CTensorPtr, n: c_int);
    fn trainer_foreach_adam_capturable(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        n: c_int,
        step: *const CTensorPtr,
        lr: c_double,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_fused_adam(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        steps: *const *const CTensorPtr,
        n: c_int,
        lr: c_double,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_unscale_and_check(
        grads: *const *const CTensorPtr,
        n: c_int,
        inv_scale: c_double,
        found: *mut c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_foreach_adam(
        params: *const *const CTensorPtr,
        grads: *const *const CTensorPtr,
        m: *const *const CTensorPtr,
        v: *const *const CTensorPtr,
        n: c_int,
        beta1: c_double,
        beta2: c_double,
        eps: c_double,
        lr_t: c_double,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
}

/// The opaque libtorch tensor behind a tch `Tensor` (an `at::Tensor`).
type CTensorPtr = torch_sys::C_tensor;

fn ptrs(ts: &[&Tensor]) -> Vec<*const CTensorPtr> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

/// Calls a shim entry point that returns 1 on failure with a message in the buffer it is given.
fn shim_call(f: impl FnOnce(*mut c_char, c_int) -> c_int) -> Result<()> {
    let mut err = [0 as c_char; 512];
    let rc = f(err.as_mut_ptr(), err.len() as c_int);
    check(rc, &err)
}

fn check(rc: c_int, err: &[c_char]) -> Result<()> {
    if rc != 0 {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        bail!("multi-tensor op failed: {msg}");
    }
    Ok(())
}

/// One Keras-style Adam step over whole lists (`_foreach_*` kernels: a few launches in all
/// instead of several per parameter).
#[allow(clippy::too_many_arguments)]
pub fn foreach_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr_t: f64,
) -> Result<()> {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n);
    let (p, g, mm, vv) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: four arrays of `n` live tensor pointers; the shim copies the handles.
    shim_call(|err, len| unsafe {
        trainer_foreach_adam(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            n as c_int,
            beta1,
            beta2,
            eps,
            lr_t,
            err,
            len,
        )
    })
}

/// Keras's Adam step with the step count (`step`, a 0-dim double tensor, incremented) and the
/// step size as device tensors: nothing read from the host, as a CUDA graph needs.
#[allow(clippy::too_many_arguments)]
pub fn foreach_adam_capturable(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    step: &Tensor,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    let (p, g, mm, vv) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: four arrays of live tensor pointers of the same length and a live step tensor.
    shim_call(|err, len| unsafe {
        trainer_foreach_adam_capturable(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            p.len() as c_int,
            step.as_ptr(),
            lr,
            beta1,
            beta2,
            eps,
            err,
            len,
        )
    })
}

/// PyTorch's fused Adam (`_fused_adam_`): `steps` (one float tensor per parameter) are
/// incremented, then the kernel applies the bias correction with them.
#[allow(clippy::too_many_arguments)]
pub fn fused_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    steps: &[&Tensor],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    let (p, g, mm, vv, s) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v), ptrs(steps));
    // SAFETY: five arrays of live tensor pointers of the same length.
    shim_call(|err, len| unsafe {
        trainer_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            mm.as_ptr(),
            vv.as_ptr(),
            s.as_ptr(),
            p.len() as c_int,
            lr,
            beta1,
            beta2,
            eps,
            err,
            len,
        )
    })
}

/// Drops the gradients of `params` (set to none, not zeroed): no fill kernel per parameter, and
/// the next backward writes instead of accumulating.
pub fn grads_to_none(params: &[&Tensor]) {
    let p = ptrs(params);
    // SAFETY: an array of live tensor pointers.
    unsafe { trainer_grads_to_none(p.as_ptr(), p.len() as c_int) };
}

/// Multiplies every tensor by `inv_scale` and says whether any holds inf or NaN, in one
/// multi-tensor kernel and one read-back.
pub fn unscale_and_check(grads: &[&Tensor], inv_scale: f64) -> Result<bool> {
    let p = ptrs(grads);
    let mut found = 0;
    // SAFETY: an array of live tensor pointers; `found` and `err` are locals.
    shim_call(|err, len| unsafe {
        trainer_unscale_and_check(
            p.as_ptr(),
            p.len() as c_int,
            inv_scale,
            &mut found,
            err,
            len,
        )
    })?;
    Ok(found != 0)
}

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
    pub fn backward_and_step(&mut self, loss: &Tensor, adam: &mut super::adam::Adam) -> Result<()> {
        (loss * self.scale).backward();
        let grads = adam.grads();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let finite = !unscale_and_check(&refs, 1.0 / self.scale)?;
        if finite {
            adam.step();
            self.good_steps += 1;
            if self.good_steps >= 2000 {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good_steps = 0;
        }
        Ok(())
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
        let x = crate::data::augment::to_input(&pixels);
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
