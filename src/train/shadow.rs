//! The weights that are validated, checkpointed and exported when the recipe asks for more than
//! the trained weights themselves: an exponential moving average of them (`--ema`), and
//! batch-norm statistics recomputed for the weights that are used (`--precise-bn`).

use tch::nn::VarStore;
use tch::Tensor;

/// A second set of the model's variables, kept next to the trained ones: their moving average,
/// or a copy made at each validation.
pub struct Shadow {
    pub vs: VarStore,
    /// (shadow, trained) variable pairs, matched by name.
    pairs: Vec<(Tensor, Tensor)>,
}

impl Shadow {
    /// `vs` holds the same variables as `trained` (the same model built on it); they start as a
    /// copy of the trained ones, in the shadow's own memory order.
    pub fn new(vs: VarStore, trained: &VarStore) -> Self {
        let theirs = trained.variables();
        let mut pairs: Vec<(String, Tensor, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let src = theirs
                    .get(&name)
                    .unwrap_or_else(|| {
                        panic!("the shadow model's {name} is not in the trained one")
                    })
                    .shallow_clone();
                (name, t, src)
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let shadow = Shadow {
            vs,
            pairs: pairs.into_iter().map(|(_, s, t)| (s, t)).collect(),
        };
        shadow.copy();
        shadow
    }

    /// shadow = decay * shadow + (1 - decay) * trained, for every variable (batch-norm statistics
    /// included).
    /// In multi-tensor kernels (one launch per few hundred tensors on CUDA).
    pub fn average(&self, decay: f64) {
        let (shadows, trained): (Vec<&Tensor>, Vec<&Tensor>) =
            self.pairs.iter().map(|(s, t)| (s, t)).unzip();
        super::kernels::foreach_lerp(&shadows, &trained, 1.0 - decay)
            .expect("multi-tensor lerp on tensors of one device and type");
    }

    /// shadow = trained.
    pub fn copy(&self) {
        tch::no_grad(|| {
            for (s, t) in &self.pairs {
                s.shallow_clone().copy_(t);
            }
        });
    }
}

/// Precise batch-norm statistics: sets every batch-norm's running mean and variance in `vs` to
/// the average over `batches` of their per-batch values, each batch weighted by its size, as
/// `forward` (a training-mode pass, which updates the running statistics with `momentum`) computes
/// them. From-scratch training leaves the running averages far behind the weights (momentum
/// 0.01 remembers about 100 steps); this makes them the statistics of the weights in use.
/// Batches of one image are skipped (batch-norm needs two values per channel).
pub fn precise_bn(
    vs: &VarStore,
    momentum: f64,
    batches: impl Iterator<Item = Tensor>,
    forward: impl Fn(&Tensor),
) {
    let stats: Vec<Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".running_mean") || name.ends_with(".running_var"))
        .map(|(_, t)| t)
        .collect();
    let sums: Vec<Tensor> = stats.iter().map(Tensor::zeros_like).collect();
    let mut images = 0i64;
    tch::no_grad(|| {
        for x in batches {
            let n = x.size()[0];
            if n < 2 {
                continue;
            }
            // From zero, one update leaves exactly momentum * (this batch's statistic).
            for s in &stats {
                let _ = s.shallow_clone().zero_();
            }
            forward(&x);
            for (sum, s) in sums.iter().zip(&stats) {
                let _ = sum.shallow_clone().g_add_(&(s * n as f64));
            }
            images += n;
        }
        if images == 0 {
            return;
        }
        for (s, sum) in stats.iter().zip(&sums) {
            s.shallow_clone().copy_(&(sum / (momentum * images as f64)));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, ModuleT};
    use tch::{Device, Kind};

    #[test]
    fn the_average_moves_by_one_minus_decay_and_copy_equals() {
        let trained = VarStore::new(Device::Cpu);
        let _a = nn::linear(trained.root() / "l", 3, 2, Default::default());
        let mine = VarStore::new(Device::Cpu);
        let _b = nn::linear(mine.root() / "l", 3, 2, Default::default());
        let shadow = Shadow::new(mine, &trained);
        let before = shadow.vs.variables()["l.weight"].copy();
        assert!(before.equal(&trained.variables()["l.weight"]));
        tch::no_grad(|| {
            let _ = trained.variables()["l.weight"]
                .shallow_clone()
                .g_add_scalar_(1.0);
        });
        shadow.average(0.9);
        let after = shadow.vs.variables()["l.weight"].copy();
        let diff = (&after - &before - 0.1).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        shadow.copy();
        assert!(shadow.vs.variables()["l.weight"].equal(&trained.variables()["l.weight"]));
    }

    #[test]
    fn the_multi_tensor_average_is_the_per_tensor_lerp_bit_for_bit() {
        use crate::model::efficientnet::{Tagger, TaggerConfig};
        let trained = VarStore::new(Device::Cpu);
        let _t = Tagger::new(&trained.root(), TaggerConfig::default());
        let mine = VarStore::new(Device::Cpu);
        let _m = Tagger::new(&mine.root(), TaggerConfig::default());
        let shadow = Shadow::new(mine, &trained);
        tch::no_grad(|| {
            for t in trained.variables().values() {
                t.shallow_clone().copy_(&(t.randn_like() * 0.1));
            }
        });
        let before = shadow.vs.variables();
        let want: Vec<(String, Tensor)> = before
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    s.detach().copy().lerp(&trained.variables()[k], 1.0 - 0.97),
                )
            })
            .collect();
        shadow.average(0.97);
        let after = shadow.vs.variables();
        for (name, w) in &want {
            assert!(after[name].equal(w), "{name}");
        }
        assert!(!after["stem_conv.weight"].equal(&trained.variables()["stem_conv.weight"]));
    }

    #[test]
    fn precise_statistics_equal_the_size_weighted_batch_statistics() {
        let vs = VarStore::new(Device::Cpu);
        let cfg = nn::BatchNormConfig {
            momentum: 0.01,
            ..Default::default()
        };
        let bn = nn::batch_norm2d(vs.root() / "bn", 3, cfg);
        tch::manual_seed(1);
        let batches: Vec<Tensor> = [4i64, 6, 1, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::randn([n, 3, 4, 4], (Kind::Float, Device::Cpu)) * 2.0 + i as f64)
            .collect();
        precise_bn(&vs, 0.01, batches.iter().map(|b| b.shallow_clone()), |x| {
            let _ = bn.forward_t(x, true);
        });
        // Direct: per channel, the batch mean and unbiased variance, weighted by batch size.
        let used: Vec<&Tensor> = batches.iter().filter(|b| b.size()[0] > 1).collect();
        let total: f64 = used.iter().map(|b| b.size()[0] as f64).sum();
        let (mut mean, mut var) = (
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        for b in &used {
            let n = b.size()[0] as f64;
            let flat = b.transpose(0, 1).reshape([3, -1]);
            mean += flat.mean_dim(1, false, Kind::Float) * (n / total);
            var += flat.var_dim(1, true, false) * (n / total);
        }
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-4;
        assert!(
            close(&bn.running_mean, &mean),
            "{} vs {}",
            bn.running_mean,
            mean
        );
        assert!(
            close(&bn.running_var, &var),
            "{} vs {}",
            bn.running_var,
            var
        );
    }
}
