//! The training step: an epoch of optimizer steps over the shuffled training images, each step's
//! global batch split into micro-batches (ranks x `--accumulate`), the seeds that make N ranks
//! draw what one process draws, and the step's inputs at fixed addresses.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use super::amp;
use super::graph::StepGraph;
use super::learner::Model;
use super::run_dir::kept_checkpoint;
use super::runlog::RunLog;
use super::settings::FitSettings;
use crate::data::augment::{self, Augment};
use crate::data::preprocess;
use crate::model::efficientnet::Tagger;
use crate::model::precision::{self, Precision};
use crate::progress;

/// The seed of epoch `epoch`'s random numbers (shuffle, augmentation, drop-connect).
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(epoch as u64)
}

/// The step's inputs at fixed addresses for full batches: indices into the image cache and the
/// augmentation parameters, refilled by a device-side copy at each step; and the CUDA graph
/// that replays a full batch's step from them, if the run uses one.
pub struct StaticInputs {
    batch: usize,
    ids: Tensor,
    params: Option<Tensor>,
    graph: Option<StepGraph>,
}

impl StaticInputs {
    pub fn new(batch: usize, augment: bool, device: Device) -> Self {
        StaticInputs {
            batch,
            ids: Tensor::zeros([batch as i64], (Kind::Int64, device)),
            params: augment.then(|| {
                Tensor::zeros(
                    [batch as i64, augment::PARAMS as i64],
                    (Kind::Float, device),
                )
            }),
            graph: None,
        }
    }

    /// Full batches run through `graph` from now on.
    pub fn use_graph(&mut self, graph: StepGraph) {
        self.graph = Some(graph);
    }

    /// When the run has a graph and the step at `start` is one it runs (a full batch, the
    /// backbone trained): the graph, and the static inputs filled with the step's.
    fn graph_step(
        &mut self,
        plan: &EpochPlan,
        start: i64,
        len: usize,
        frozen: bool,
    ) -> Option<(&mut StepGraph, Tensor, Option<Tensor>)> {
        if self.graph.is_none() || len != self.batch || frozen {
            return None;
        }
        let (ids, params) = self.fill(&plan.order, plan.params.as_ref(), start, len as i64);
        self.graph.as_mut().map(|g| (g, ids, params))
    }

    /// The indices and augmentation parameters (if any) of the batch at `start`: the static
    /// buffers, refilled, for a full batch; plain slices for a partial one.
    fn fill(
        &mut self,
        order: &Tensor,
        params: Option<&Tensor>,
        start: i64,
        len: i64,
    ) -> (Tensor, Option<Tensor>) {
        let ids = order.narrow(0, start, len);
        let batch_params = params.map(|p| p.narrow(0, start, len));
        if len as usize != self.batch {
            return (ids, batch_params);
        }
        self.ids.copy_(&ids);
        let filled = match (&mut self.params, batch_params) {
            (Some(buf), Some(p)) => {
                buf.copy_(&p);
                Some(buf.shallow_clone())
            }
            (_, other) => other,
        };
        (self.ids.shallow_clone(), filled)
    }
}

/// The seed of a micro-batch's drop-connect masks when a step is split into several: it depends
/// only on the micro-batch's place in the global batch, so N ranks draw what one process
/// accumulating N micro-batches draws.
fn micro_seed(epoch_seed: u64, step: usize, parts: usize, part: usize) -> i64 {
    let place = (step * parts + part + 1) as u64;
    epoch_seed.wrapping_add(place.wrapping_mul(0xBF58_476D_1CE4_E5B9)) as i64
}

/// What one epoch of training gave.
pub struct Trained {
    pub loss: f64,
    pub images: usize,
    pub seconds: f64,
    pub order: Tensor,
    pub interrupted: bool,
}

/// The unchanging inputs of the training loop.
pub struct Loop<'a> {
    pub settings: &'a FitSettings,
    pub run_dir: &'a Path,
    pub pixels: &'a Tensor,
    pub targets: &'a Tensor,
    pub pos_weight: Option<&'a Tensor>,
    pub ddp: Option<&'a super::ddp::Ddp>,
    pub device: Device,
    /// Micro-batches of one step in the whole job (ranks x --accumulate).
    pub parts: usize,
}

/// An epoch's shuffled order and augmentation parameters (on the device, one transfer each; the
/// steps only slice them) and its steps.
struct EpochPlan {
    seed: u64,
    order: Tensor,
    params: Option<Tensor>,
    images: usize,
    /// Steps the schedule counts (every batch, the last partial one included).
    steps: usize,
    /// Steps run: a last partial batch smaller than the number of micro-batches gives no step
    /// (each micro-batch shrinks alike, what does not divide is left out).
    run: usize,
}

fn plan(lp: &Loop, train_idx: &[i64], epoch: usize) -> EpochPlan {
    let settings = lp.settings;
    let seed = epoch_seed(settings.seed, epoch);
    tch::manual_seed(seed as i64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order = train_idx.to_vec();
    order.shuffle(&mut rng);
    let params = (settings.augment == Augment::Original).then(|| {
        let p = augment::draw_params(&mut rng, order.len(), settings.image_size);
        Tensor::from_slice(&p)
            .view([order.len() as i64, augment::PARAMS as i64])
            .to_device(lp.device)
    });
    let bs = settings.batch_size;
    let steps = order.len().div_ceil(bs);
    let run = match (order.len() - (steps - 1) * bs) / lp.parts {
        0 => steps - 1,
        _ => steps,
    };
    EpochPlan {
        seed,
        order: Tensor::from_slice(&order).to_device(lp.device),
        params,
        images: order.len(),
        steps,
        run,
    }
}

/// The global number of step `step` of `epoch` (from 1), as the schedule counts steps.
fn global_step(plan: &EpochPlan, epoch: usize, step: usize) -> u64 {
    ((epoch - 1) * plan.steps + step + 1) as u64
}

/// One epoch of optimizer steps. Each step's global batch is split into `parts` micro-batches of
/// equal size; this rank runs its --accumulate of them, gradients accumulate, and the reducer
/// (with several ranks) averages them during the last backward pass. Each step's loss (this
/// rank's images) goes to `log`, read back with the running loss about twice a second.
pub fn train_epoch(
    lp: &Loop,
    model: &mut Model,
    train_idx: &[i64],
    epoch: usize,
    inputs: &mut StaticInputs,
    scaler: &mut amp::LossScaler,
    log: &mut dyn RunLog,
) -> Result<Trained> {
    let plan = plan(lp, train_idx, epoch);
    let bar = progress::bar(plan.images as u64, "images");
    bar.set_prefix(format!("epoch {epoch}/{}", lp.settings.epochs));
    let t0 = Instant::now();
    let loss_acc = Tensor::zeros([], (Kind::Float, lp.device));
    let (mut seen, mut last_read) = (0usize, Instant::now());
    let mut pending: Vec<(u64, f64, Tensor)> = Vec::new();
    let trained = |interrupted: bool, loss: f64, images: usize| Trained {
        loss,
        images,
        seconds: t0.elapsed().as_secs_f64(),
        order: plan.order.shallow_clone(),
        interrupted,
    };
    for step in 0..plan.run {
        let stop = progress::interrupted();
        if lp.ddp.map_or(Ok(stop), |d| d.any(stop))? {
            bar.finish_and_clear();
            return Ok(trained(true, f64::NAN, seen));
        }
        let (sum, images) =
            optimizer_step(lp, model, &plan, (epoch, step), inputs, scaler, &loss_acc)?;
        seen += images;
        let global = global_step(&plan, epoch, step);
        pending.push((global, model.adam.lr(), sum / images.max(1) as f64));
        bar.inc(images as u64);
        // Read the losses back (a device sync) about twice a second, and at the end.
        if last_read.elapsed().as_secs_f64() > 0.5 || step + 1 == plan.run {
            last_read = Instant::now();
            let loss_so_far = loss_acc.double_value(&[]) / seen.max(1) as f64;
            if !loss_so_far.is_finite() {
                bar.finish_and_clear();
                bail!(
                    "epoch {epoch}, by step {}: the training loss is {loss_so_far}; stopping. {}; a lower --lr may help",
                    step + 1,
                    kept_checkpoint(lp.run_dir, epoch)
                );
            }
            log_steps(log, &mut pending)?;
            bar.set_message(format!("loss {loss_so_far:.4}"));
        }
    }
    bar.finish_and_clear();
    // The job's mean loss over every image of the epoch.
    let sums = [loss_acc.double_value(&[]), seen as f64];
    let sums = match lp.ddp {
        Some(d) => d.sum(&sums)?,
        None => sums.to_vec(),
    };
    let (loss, images) = (sums[0] / sums[1].max(1.0), sums[1] as usize);
    Ok(trained(false, loss, images))
}

/// Gives `log` the steps' losses kept on the device, read in one transfer.
fn log_steps(log: &mut dyn RunLog, pending: &mut Vec<(u64, f64, Tensor)>) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let losses: Vec<Tensor> = pending.iter().map(|(_, _, l)| l.shallow_clone()).collect();
    let values = Vec::<f64>::try_from(Tensor::stack(&losses, 0).to_kind(Kind::Double))?;
    for ((step, lr, _), loss) in pending.drain(..).zip(values) {
        log.step(step, loss, lr)?;
    }
    Ok(())
}

/// Step `step` of `epoch`: the learning rate of the schedule, this rank's micro-batches forward
/// and backward (or the CUDA graph's replay of a full batch), the optimizer's update and the
/// moving average. The step's summed loss is added to `loss_acc` (on the device); returns it
/// (detached) and the step's images on this rank.
fn optimizer_step(
    lp: &Loop,
    model: &mut Model,
    plan: &EpochPlan,
    (epoch, step): (usize, usize),
    inputs: &mut StaticInputs,
    scaler: &mut amp::LossScaler,
    loss_acc: &Tensor,
) -> Result<(Tensor, usize)> {
    let settings = lp.settings;
    let start = step * settings.batch_size;
    let each = settings.batch_size.min(plan.images - start) / lp.parts;
    let at_step = (epoch - 1) * plan.steps + step;
    model.adam.set_lr(
        settings
            .recipe
            .lr_at(settings.lr, at_step, plan.steps, settings.epochs),
    );
    let frozen = epoch <= settings.recipe.freeze_backbone_epochs;
    let sum = match inputs.graph_step(plan, start as i64, each, frozen) {
        Some((graph, ids, params)) => {
            let mean = graph.step(&mut model.adam, |adam| {
                let loss = batch_loss(lp, &model.net, &ids, params.as_ref(), frozen);
                loss.f_backward()?;
                adam.step_on_device()?;
                Ok(loss)
            })?;
            let sum = tch::no_grad(|| &mean * each as f64);
            let _ = tch::no_grad(|| loss_acc.shallow_clone().g_add_(&sum));
            sum
        }
        None => {
            let at = (step, start, each, frozen);
            eager_step(lp, model, plan, at, inputs, scaler, loss_acc)?
        }
    };
    if let (Some(decay), Some((shadow, _))) =
        (settings.recipe.ema_decay(model.adam.step), &model.shadow)
    {
        shadow.average(decay);
    }
    Ok((sum, each * settings.accumulate))
}

/// This rank's micro-batches of step `step` (the global batch from image `start`, `each` images a
/// micro-batch), eagerly: gradients accumulated over them (the reducer, with several ranks,
/// averaging them in the last backward pass), then the update. Each micro-batch's summed loss is
/// added to `loss_acc`; returns theirs (detached).
fn eager_step(
    lp: &Loop,
    model: &mut Model,
    plan: &EpochPlan,
    (step, start, each, frozen): (usize, usize, usize, bool),
    inputs: &mut StaticInputs,
    scaler: &mut amp::LossScaler,
    loss_acc: &Tensor,
) -> Result<Tensor> {
    let settings = lp.settings;
    let rank = lp.ddp.map_or(0, |d| d.rank());
    model.adam.zero_grad();
    let sum = Tensor::zeros([], (Kind::Float, lp.device));
    for k in 0..settings.accumulate {
        let part = rank * settings.accumulate + k;
        if lp.parts > 1 {
            tch::manual_seed(micro_seed(plan.seed, step, lp.parts, part));
        }
        let at = (start + part * each) as i64;
        let ctx = (&plan.order, plan.params.as_ref(), at, each, frozen);
        let loss = micro_step(lp, model, inputs, ctx)?;
        if settings.precision == Precision::Fp16 {
            scaler
                .backward(&loss)
                .map_err(|e| exchange_failed(lp.ddp, e))?;
            if scaler.unscale(&model.adam.grads())? {
                model.adam.step();
            }
        } else {
            // With several ranks the reducer exchanges gradients inside backward, so a rank that
            // stopped shows here.
            (&loss / settings.accumulate as f64)
                .f_backward()
                .map_err(|e| exchange_failed(lp.ddp, e))?;
        }
        tch::no_grad(|| {
            let part_sum = loss.detach() * each as f64;
            let _ = loss_acc.shallow_clone().g_add_(&part_sum);
            let _ = sum.shallow_clone().g_add_(&part_sum);
        });
    }
    if settings.precision != Precision::Fp16 {
        model.adam.step();
    }
    Ok(sum)
}

/// A failed backward pass: with several ranks, the gradient exchange (another rank stopped).
fn exchange_failed(ddp: Option<&super::ddp::Ddp>, e: tch::TchError) -> anyhow::Error {
    let reason = e.to_string();
    let reason = reason.lines().next().unwrap_or("").to_string();
    match ddp {
        Some(d) => anyhow::anyhow!(
            "rank {}: the gradient exchange across ranks failed (did another rank stop?): {reason}",
            d.rank()
        ),
        None => anyhow::anyhow!("backward pass failed: {reason}"),
    }
}

/// One micro-batch's forward pass and mean loss (the reducer armed for its backward pass).
/// `(order, params, at, len, frozen)`: the micro-batch's images `at..at + len` of the epoch's
/// order, with their augmentation parameters, and whether the backbone is frozen.
type MicroBatch<'a> = (&'a Tensor, Option<&'a Tensor>, i64, usize, bool);

fn micro_step(
    lp: &Loop,
    model: &Model,
    inputs: &mut StaticInputs,
    (order, params, at, len, frozen): MicroBatch,
) -> Result<Tensor> {
    // A full micro-batch reads its indices and augmentation parameters from buffers at fixed
    // addresses, filled by a copy (what a captured CUDA graph replays from); a partial one runs
    // eagerly from slices.
    let (ids, batch_params) = inputs.fill(order, params, at, len as i64);
    let loss = batch_loss(lp, &model.net, &ids, batch_params.as_ref(), frozen);
    if let Some(d) = lp.ddp {
        d.before_backward()?;
    }
    Ok(loss)
}

/// The mean loss of the images `ids` of the cache (augmented with `params`, if any), forward in
/// training mode; while the backbone is `frozen` only the head gets gradients.
fn batch_loss(
    lp: &Loop,
    net: &Tagger,
    ids: &Tensor,
    params: Option<&Tensor>,
    frozen: bool,
) -> Tensor {
    let (settings, device) = (lp.settings, lp.device);
    let px = if lp.pixels.device() == device {
        lp.pixels.index_select(0, ids)
    } else {
        lp.pixels
            .index_select(0, &ids.to_device(lp.pixels.device()))
            .to_device(device)
    };
    let x = match params {
        Some(p) => augment::apply(&px, p),
        None => preprocess::to_input(&px),
    };
    let x = precision::layout(&x, settings.channels_last);
    let y = lp.targets.index_select(0, ids);
    let logits = precision::autocast(settings.precision, device, || match frozen {
        true => net.head(&net.features_t(&x, true).detach()),
        false => net.forward_t(&x, true),
    });
    settings.loss.loss(&logits, &y, lp.pos_weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batches_come_from_buffers_at_fixed_addresses_and_partial_ones_from_slices() {
        let mut inputs = StaticInputs::new(4, true, Device::Cpu);
        let order = Tensor::from_slice(&[9i64, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
        let params = Tensor::arange(10 * augment::PARAMS as i64, (Kind::Float, Device::Cpu))
            .view([10, augment::PARAMS as i64]);
        let (a, pa) = inputs.fill(&order, Some(&params), 0, 4);
        let addresses = (a.data_ptr(), pa.as_ref().unwrap().data_ptr());
        let (b, pb) = inputs.fill(&order, Some(&params), 4, 4);
        let pb = pb.unwrap();
        assert_eq!((b.data_ptr(), pb.data_ptr()), addresses, "the same buffers");
        assert_eq!(Vec::<i64>::try_from(&b).unwrap(), [5, 4, 3, 2]);
        assert!(pb.equal(&params.narrow(0, 4, 4)));
        let (c, pc) = inputs.fill(&order, Some(&params), 8, 2);
        let pc = pc.unwrap();
        assert!(c.data_ptr() != addresses.0 && pc.data_ptr() != addresses.1);
        assert!(pc.equal(&params.narrow(0, 8, 2)));
        assert_eq!(Vec::<i64>::try_from(&c).unwrap(), [1, 0]);
    }
}
