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

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}

/// Adam over the trainable variables of a VarStore, in sorted name order.
pub struct Adam {
    lr: f64,
    pub step: i64,
    pub kernel: Kernel,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Per-parameter step counts for the fused kernel (incremented at each of its steps).
    steps: Vec<Tensor>,
    /// The step count and the learning rate on the device, for the capturable kernel.
    step_t: Tensor,
    lr_t: Tensor,
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
        let lr_t = Tensor::full([], lr, (tch::Kind::Double, vs.device()));
        Adam {
            lr,
            step: 0,
            kernel: Kernel::Foreach,
            params,
            m,
            v,
            steps,
            step_t,
            lr_t,
        }
    }

    /// The learning rate of the next steps.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate of the next steps (on the device too, where a captured step reads
    /// it: call it outside a capture).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
        if self.kernel == Kernel::Capturable {
            let _ = self.lr_t.fill_(lr);
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
        let all = grads.iter().all(Tensor::defined);
        if self.kernel == Kernel::Capturable && all {
            self.capturable(&grads)
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
        // The device's step counts follow the host's, for the steps of the other kernels.
        tch::no_grad(|| {
            let _ = self.step_t.fill_(t);
            for s in &mut self.steps {
                let _ = s.fill_(t);
            }
        });
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

    /// One update that reads nothing from the host, as a CUDA graph records it: the capturable
    /// kernel; an error if the kernel is another or a parameter got no gradient.
    pub fn step_on_device(&mut self) -> anyhow::Result<()> {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        if self.kernel != Kernel::Capturable {
            anyhow::bail!("a step on the device needs Adam's capturable kernel");
        }
        if let Some((name, _)) = (self.params.iter().zip(&grads)).find(|(_, g)| !g.defined()) {
            anyhow::bail!(
                "parameter {} got no gradient: a CUDA graph's step needs every parameter trained",
                name.0
            );
        }
        self.step += 1;
        self.capturable(&grads)
    }

    /// The capturable kernel's update (step count and learning rate on the device).
    fn capturable(&self, grads: &[Tensor]) -> anyhow::Result<()> {
        let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        super::kernels::foreach_adam_capturable(
            &params,
            &refs(grads),
            &refs(&self.m),
            &refs(&self.v),
            &self.step_t,
            &self.lr_t,
            BETA1,
            BETA2,
            EPSILON,
        )
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
    fn steps_where_a_parameter_has_no_gradient_keep_every_kernels_step_count() {
        // Two steps train only `a` (as a frozen backbone does: the plain fallback), two train
        // both; the fused and capturable kernels' device step counts must have followed.
        let run = |kernel: Kernel| {
            let vs = nn::VarStore::new(Device::Cpu);
            let a = vs.root().var("a", &[3], nn::Init::Const(1.0));
            let b = vs.root().var("b", &[3], nn::Init::Const(1.0));
            let mut opt = Adam::new(&vs, 0.1);
            opt.kernel = kernel;
            for i in 0..4 {
                opt.zero_grad();
                let mut loss = (&a * &a).sum(Kind::Float);
                if i >= 2 {
                    loss += (&b * &b * 3.0).sum(Kind::Float);
                }
                loss.backward();
                opt.step();
            }
            Tensor::cat(&[a, b], 0)
        };
        let want = run(Kernel::Foreach);
        for kernel in [Kernel::Fused, Kernel::Capturable] {
            let diff = (run(kernel) - &want).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{kernel:?}: {diff}");
        }
    }

    #[test]
    fn every_kernel_and_grads_set_to_none_give_the_same_weights_after_three_steps_of_changing_lr() {
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
            for (i, step) in grads.iter().enumerate() {
                // A learning rate that changes each step, as a schedule sets it.
                opt.set_lr(1e-3 * (i + 1) as f64);
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
