//! Data-parallel training on several ranks, as PyTorch's DistributedDataParallel does it: the
//! weights broadcast from rank 0 at the start, c10d's Reducer averaging gradients during
//! backward, and the few decisions all ranks must share (stop now, the epoch's loss).

use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

use crate::dist::{Group, Reducer};

/// This rank's part in a job of several.
pub struct Ddp {
    group: Group,
    reducer: Reducer,
}

impl Ddp {
    /// Makes every rank start from rank 0's variables (parameters and batch-norm statistics),
    /// then sets up the gradient reducer over `params` (the optimizer's, in its order).
    pub fn new(group: Group, vs: &nn::VarStore, params: &[Tensor]) -> Result<Ddp> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| -> Result<()> {
            for (_, v) in &vars {
                // Gloo wants contiguous tensors: channels-last ones go through a copy.
                let buf = v.contiguous();
                group.broadcast(&buf, 0)?;
                if buf.data_ptr() != v.data_ptr() {
                    v.shallow_clone().copy_(&buf);
                }
            }
            Ok(())
        })?;
        let reducer = Reducer::new(&group, params)?;
        Ok(Ddp { group, reducer })
    }

    pub fn rank(&self) -> usize {
        self.group.job.rank
    }

    pub fn world(&self) -> usize {
        self.group.job.world
    }

    /// Before each backward pass.
    pub fn before_backward(&self) -> Result<()> {
        self.reducer.prepare()
    }

    /// Whether any rank wants to stop (Ctrl-C reaches each rank at its own time).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let t = Tensor::from_slice(&[flag as i64 as f64]);
        self.group.allreduce_sum(&t)?;
        Ok(t.double_value(&[0]) > 0.0)
    }

    /// Rank 0's decision, for every rank.
    pub fn from_rank0(&self, flag: bool) -> Result<bool> {
        let t = Tensor::from_slice(&[flag as i64 as f64]);
        self.group.broadcast(&t, 0)?;
        Ok(t.double_value(&[0]) > 0.0)
    }

    /// Element-wise sums over ranks (in f64 on the host).
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        self.group.allreduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }
}

/// Images per micro-batch of one rank: the global `batch` of an optimizer step split over
/// `world` ranks and `accumulate` micro-batches each. It must divide exactly, so that every rank
/// does the same work and the step's gradient is the whole batch's.
pub fn micro_batch(batch: usize, world: usize, accumulate: usize) -> Result<usize> {
    let parts = world * accumulate;
    if parts == 0 || !batch.is_multiple_of(parts) {
        bail!(
            "--batch-size {batch} (the global batch of one step) must divide by the number of ranks x --accumulate ({world} x {accumulate} = {parts})"
        );
    }
    Ok(batch / parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_batch_splits_exactly_or_not_at_all() {
        assert_eq!(micro_batch(48, 1, 1).unwrap(), 48);
        assert_eq!(micro_batch(48, 2, 3).unwrap(), 8);
        let err = micro_batch(48, 5, 1).unwrap_err().to_string();
        assert!(err.contains("5 x 1 = 5"), "{err}");
    }
}
