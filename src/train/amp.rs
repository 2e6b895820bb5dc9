//! What only training adds to mixed precision: fp16 dynamic loss scaling. Precision, autocast and
//! the channels-last layout, which inference uses too, live in `model::precision`.

use anyhow::Result;
use tch::Tensor;

use super::kernels::unscale_and_check;

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
    use super::*;

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
}
