//! Adam as Keras implements it (epsilon 1e-7 added to sqrt(v), bias correction folded into the
//! step size), with its state in tensors that checkpoints save and restore.

use tch::{nn::VarStore, Tensor};

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPSILON: f64 = 1e-7;

/// How the update is computed; all three give the same weights (within 1e-6, tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// One small kernel chain per parameter.
    Plain,
    /// Multi-tensor (`_foreach_*`) kernels over all parameters, Keras's formula.
    Foreach,
    /// PyTorch's `_fused_adam_` with the epsilon that makes it Keras's update.
    Fused,
    /// Multi-tensor kernels with the step count and step size as device tensors: nothing read
    /// from the host, so the step can be captured in a CUDA graph.
    Capturable,
}

/// Adam over the trainable variables of a VarStore, in sorted name order.
pub struct Adam {
    pub lr: f64,
    pub step: i64,
    pub kernel: Kernel,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Per-parameter step counts for the fused kernel (incremented at each of its steps).
    steps: Vec<Tensor>,
    /// The step count on the device, for the capturable kernel.
    step_t: Tensor,
}

impl Adam {
    pub fn new(vs: &VarStore, lr: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, t)| t.zeros_like()).collect();
        let v = params.iter().map(|(_, t)| t.zeros_like()).collect();
        let steps = params
            .iter()
            .map(|(_, t)| Tensor::zeros([], (tch::Kind::Float, t.device())))
            .collect();
        let step_t = Tensor::zeros([], (tch::Kind::Double, vs.device()));
        Adam {
            lr,
            step: 0,
            kernel: Kernel::Foreach,
            params,
            m,
            v,
            steps,
            step_t,
        }
    }

    /// The parameters it updates, in its order.
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Clears the gradients before a backward pass: set to none, as PyTorch does by default.
    pub fn zero_grad(&mut self) {
        let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        super::kernels::grads_to_none(&params);
    }

    /// One update from the gradients of the last backward pass.
    pub fn step(&mut self) {
        self.step += 1;
        let t = self.step as f64;
        let lr_t = self.lr * (1.0 - BETA2.powf(t)).sqrt() / (1.0 - BETA1.powf(t));
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        fn refs(v: &[Tensor]) -> Vec<&Tensor> {
            v.iter().collect()
        }
        let all = grads.iter().all(Tensor::defined);
        if self.kernel == Kernel::Capturable && all {
            let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
            super::kernels::foreach_adam_capturable(
                &params,
                &refs(&grads),
                &refs(&self.m),
                &refs(&self.v),
                &self.step_t,
                self.lr,
                BETA1,
                BETA2,
                EPSILON,
            )
            .expect("multi-tensor Adam on tensors of one device and type");
            return;
        }
        if self.kernel == Kernel::Fused && all {
            let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
            // PyTorch divides sqrt(v) by sqrt(1 - beta2^t) before adding epsilon; Keras adds it
            // to sqrt(v) itself.
            let eps = EPSILON / (1.0 - BETA2.powf(t)).sqrt();
            super::kernels::fused_adam(
                &params,
                &refs(&grads),
                &refs(&self.m),
                &refs(&self.v),
                &refs(&self.steps),
                self.lr,
                BETA1,
                BETA2,
                eps,
            )
            .expect("fused Adam on tensors of one device and type");
            return;
        }
        if self.kernel != Kernel::Plain && all {
            let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
            super::kernels::foreach_adam(
                &params,
                &refs(&grads),
                &refs(&self.m),
                &refs(&self.v),
                BETA1,
                BETA2,
                EPSILON,
                lr_t,
            )
            .expect("multi-tensor Adam on tensors of one device and type");
            return;
        }
        tch::no_grad(|| {
            for ((((_, p), g), m), v) in self
                .params
                .iter_mut()
                .zip(&grads)
                .zip(&mut self.m)
                .zip(&mut self.v)
            {
                if !g.defined() {
                    continue;
                }
                let _ = m.lerp_(g, 1.0 - BETA1);
                let _ = v.g_mul_scalar_(BETA2).addcmul_(g, &(g * (1.0 - BETA2)));
                let update = &*m / (v.sqrt() + EPSILON) * lr_t;
                let _ = p.g_sub_(&update);
            }
        });
    }

    /// The gradients of the parameters (for loss-scale unscaling and finiteness checks).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// The moments, named `adam.m.<param>` and `adam.v.<param>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.push((format!("adam.m.{name}"), m.shallow_clone()));
            out.push((format!("adam.v.{name}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the moments saved by [`Adam::state`]; every one must be present.
    pub fn load_state(
        &mut self,
        step: i64,
        get: impl Fn(&str) -> Option<Tensor>,
    ) -> anyhow::Result<()> {
        tch::no_grad(|| -> anyhow::Result<()> {
            for ((name, _), (m, v)) in self
                .params
                .iter()
                .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            {
                for (key, dst) in [(format!("adam.m.{name}"), m), (format!("adam.v.{name}"), v)] {
                    let src = get(&key)
                        .ok_or_else(|| anyhow::anyhow!("optimizer state {key} is missing"))?;
                    dst.copy_(&src);
                }
            }
            for s in &mut self.steps {
                let _ = s.fill_(step as f64);
            }
            let _ = self.step_t.fill_(step as f64);
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn first_steps_match_the_keras_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2], nn::Init::Const(1.0));
        let mut opt = Adam::new(&vs, 0.1);
        opt.kernel = Kernel::Plain;
        // loss = 3 * w0 + w1^2 -> grad (3, 2 w1)
        for _ in 0..2 {
            opt.zero_grad();
            let loss = w.get(0) * 3.0 + w.get(1) * w.get(1);
            loss.backward();
            opt.step();
        }
        // With a constant gradient every Adam step moves by lr (up to epsilon): w0 = 1 - 2 * 0.1.
        let got = Vec::<f32>::try_from(&w.to_kind(Kind::Float)).unwrap();
        assert!((got[0] - 0.8).abs() < 1e-5, "{got:?}");
        // w1's gradient shrinks as it moves, so it moves by 0.1 then by a bit less.
        assert!(got[1] < 0.9 && got[1] > 0.79, "{got:?}");
    }

    #[test]
    fn every_kernel_and_grads_set_to_none_give_the_same_weights_after_three_steps() {
        use crate::model::efficientnet::{Tagger, TaggerConfig};
        // The B0 tagger's parameters; each step's gradients are fixed random tensors (the loss
        // sum(p * r) has gradient r), so the two optimizers see the same gradients.
        let init = nn::VarStore::new(Device::Cpu);
        let _ = Tagger::new(&init.root(), TaggerConfig::default());
        let vars = init.variables();
        let mut keys: Vec<&String> = vars.keys().filter(|k| vars[*k].requires_grad()).collect();
        keys.sort();
        let grads: Vec<Vec<Tensor>> = (0..3)
            .map(|_| {
                keys.iter()
                    .map(|k| Tensor::randn_like(&vars[*k]) * 0.01)
                    .collect()
            })
            .collect();
        // `none`: gradients set to none between steps; otherwise zeroed in place, as before.
        let run = |kernel: Kernel, none: bool| {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let _ = Tagger::new(&vs.root(), TaggerConfig::default());
            vs.copy(&init).unwrap();
            let mut opt = Adam::new(&vs, 1e-3);
            opt.kernel = kernel;
            let mut v = vs.variables();
            for step in &grads {
                if none {
                    opt.zero_grad();
                    assert!(v.values().all(|t| !t.grad().defined()));
                } else {
                    v.values_mut().for_each(|t| t.zero_grad());
                }
                let loss = keys
                    .iter()
                    .zip(step)
                    .map(|(k, r)| (&v[*k] * r).sum(Kind::Float))
                    .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
                loss.backward();
                opt.step();
            }
            vs
        };
        let a = run(Kernel::Foreach, true);
        let va = a.variables();
        let mut moved = 0.0f64;
        for other in [
            run(Kernel::Plain, true),
            run(Kernel::Foreach, false),
            run(Kernel::Fused, true),
            run(Kernel::Capturable, true),
        ] {
            let vb = other.variables();
            for (name, t) in &va {
                let diff = (t - &vb[name]).abs().max().double_value(&[]);
                assert!(diff <= 1e-6, "{name}: {diff}");
                moved = moved.max((t - &vars[name]).abs().max().double_value(&[]));
            }
        }
        assert!(moved > 1e-3, "the steps moved the weights ({moved})");
    }
}
