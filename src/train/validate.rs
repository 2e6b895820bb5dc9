//! Validation: the used weights in eval mode over the validation images, giving the epoch's
//! [`ValidationRecord`] (BCE, F1 at 0.5, average precision).

use anyhow::Result;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use super::graph::Recorded;

use crate::data::preprocess;
use crate::history::ValidationRecord;
use crate::model::efficientnet::Tagger;
use crate::model::precision;

/// The validation forward pass of a full batch recorded in a CUDA graph (`fit --cuda-graphs
/// on`), for one network: its image indices and logits at fixed addresses.
pub struct EvalGraph {
    recorded: Recorded,
    /// What the graph was recorded for: the network, the pixels' address and the layout.
    serves: Option<(*const Tagger, usize, bool)>,
    ids: Tensor,
    logits: Tensor,
}

impl EvalGraph {
    /// One eager warm-up pass (cuDNN's benchmark picks its kernels) before the capture.
    pub const WARMUP: usize = 1;

    pub fn new(batch: usize, labels: usize, device: Device) -> Result<EvalGraph> {
        Ok(EvalGraph {
            recorded: Recorded::new(device, Self::WARMUP)?,
            serves: None,
            ids: Tensor::zeros([batch as i64], (Kind::Int64, device)),
            logits: Tensor::zeros([batch as i64, labels as i64], (Kind::Float, device)),
        })
    }

    /// The logits of `net` on the images `ids`, through the graph when it serves them (the
    /// same network, a full batch, pixels where the graph runs); `None` otherwise.
    fn logits(
        &mut self,
        net: &Tagger,
        pixels: &Tensor,
        ids: &Tensor,
        channels_last: bool,
    ) -> Option<Result<Tensor>> {
        let fits = ids.size() == self.ids.size() && pixels.device() == self.ids.device();
        let these = (
            net as *const Tagger,
            pixels.data_ptr() as usize,
            channels_last,
        );
        if !fits || self.serves.is_some_and(|s| s != these) {
            return None;
        }
        self.serves = Some(these);
        self.ids.copy_(ids);
        let (static_ids, out) = (&self.ids, &self.logits);
        let ran = self.recorded.run(|| {
            let x = input(pixels, static_ids, pixels.device(), channels_last);
            out.shallow_clone().copy_(&net.forward_t(&x, false));
            Ok(())
        });
        Some(ran.map(|_| self.logits.shallow_clone()))
    }
}

/// The network's input on `device` for the images `ids` of `pixels`.
fn input(pixels: &Tensor, ids: &Tensor, device: Device, channels_last: bool) -> Tensor {
    let x = preprocess::to_input(&pixels.index_select(0, ids).to_device(device));
    precision::layout(&x, channels_last)
}

/// Probabilities and the targets they are scored against (both on the CPU), and the mean BCE,
/// over the images `idx` of `pixels` / `targets`, in eval mode. The batches are gathered where the
/// pixels are (the device copy when it fits), the loss is summed on the device, and everything
/// comes back in one read at the end. With `graph`, full batches run through it.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    net: &Tagger,
    pixels: &Tensor,
    targets: &Tensor,
    idx: &[i64],
    batch: usize,
    device: Device,
    channels_last: bool,
    mut graph: Option<&mut EvalGraph>,
) -> Result<(Tensor, Tensor, f64)> {
    let (mut probs, mut ys) = (Vec::new(), Vec::new());
    let loss_sum = Tensor::zeros([], (Kind::Float, device));
    tch::no_grad(|| -> Result<()> {
        for chunk in idx.chunks(batch.max(1)) {
            let ids = Tensor::from_slice(chunk).to_device(pixels.device());
            let y = targets
                .index_select(0, &ids.to_device(targets.device()))
                .to_device(device);
            let logits = match graph
                .as_deref_mut()
                .and_then(|g| g.logits(net, pixels, &ids, channels_last))
            {
                Some(logits) => logits?,
                None => net.forward_t(&input(pixels, &ids, device, channels_last), false),
            };
            let loss = super::loss::validation_bce_sum(&logits, &y);
            let _ = loss_sum.shallow_clone().g_add_(&loss);
            probs.push(logits.sigmoid());
            ys.push(y);
        }
        Ok(())
    })?;
    let labels = targets.size()[1];
    let host = |parts: &[Tensor]| match parts.is_empty() {
        true => Tensor::zeros([0, labels], (Kind::Float, Device::Cpu)),
        false => Tensor::cat(parts, 0).to_device(Device::Cpu),
    };
    Ok((
        host(&probs),
        host(&ys),
        loss_sum.double_value(&[]) / (idx.len() as f64 * labels as f64).max(1.0),
    ))
}

/// The validation of `net` over the images `idx` (none without validation images); with
/// `graph`, its full batches run through that CUDA graph.
pub fn validate(
    net: &Tagger,
    pixels: &Tensor,
    targets: &Tensor,
    idx: &[i64],
    batch: usize,
    channels_last: bool,
    graph: Option<&mut EvalGraph>,
) -> Result<Option<ValidationRecord>> {
    if idx.is_empty() {
        return Ok(None);
    }
    let device = targets.device();
    let (probs, t, loss) = evaluate(
        net,
        pixels,
        targets,
        idx,
        batch,
        device,
        channels_last,
        graph,
    )?;
    let labels = targets.size()[1] as usize;
    Ok(Some(ValidationRecord::new(
        loss,
        &to_vec(&probs),
        &to_vec(&t),
        labels,
    )))
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
        .expect("floats")
}
