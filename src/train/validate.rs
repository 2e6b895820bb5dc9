//! Validation: the used weights in eval mode over the validation images, giving the epoch's
//! [`ValidationRecord`] (BCE, F1 at 0.5, average precision).

use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use crate::data::preprocess;
use crate::history::ValidationRecord;
use crate::model::efficientnet::Tagger;
use crate::model::precision;

/// Probabilities and the targets they are scored against (both on the CPU), and the mean BCE,
/// over the images `idx` of `pixels` / `targets`, in eval mode. The batches are gathered where the
/// pixels are (the device copy when it fits), the loss is summed on the device, and everything
/// comes back in one read at the end.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    net: &Tagger,
    pixels: &Tensor,
    targets: &Tensor,
    idx: &[i64],
    batch: usize,
    device: Device,
    channels_last: bool,
) -> (Tensor, Tensor, f64) {
    let (mut probs, mut ys) = (Vec::new(), Vec::new());
    let loss_sum = Tensor::zeros([], (Kind::Float, device));
    tch::no_grad(|| {
        for chunk in idx.chunks(batch.max(1)) {
            let ids = Tensor::from_slice(chunk).to_device(pixels.device());
            let x = preprocess::to_input(&pixels.index_select(0, &ids).to_device(device));
            let x = precision::layout(&x, channels_last);
            let y = targets
                .index_select(0, &ids.to_device(targets.device()))
                .to_device(device);
            let logits = net.forward_t(&x, false);
            let loss = super::loss::validation_bce_sum(&logits, &y);
            let _ = loss_sum.shallow_clone().g_add_(&loss);
            probs.push(logits.sigmoid());
            ys.push(y);
        }
    });
    let labels = targets.size()[1];
    let host = |parts: &[Tensor]| match parts.is_empty() {
        true => Tensor::zeros([0, labels], (Kind::Float, Device::Cpu)),
        false => Tensor::cat(parts, 0).to_device(Device::Cpu),
    };
    (
        host(&probs),
        host(&ys),
        loss_sum.double_value(&[]) / (idx.len() as f64 * labels as f64).max(1.0),
    )
}

/// The validation of `net` over the images `idx` (none without validation images).
pub fn validate(
    net: &Tagger,
    pixels: &Tensor,
    targets: &Tensor,
    idx: &[i64],
    batch: usize,
    channels_last: bool,
) -> Option<ValidationRecord> {
    if idx.is_empty() {
        return None;
    }
    let device = targets.device();
    let (probs, t, loss) = evaluate(net, pixels, targets, idx, batch, device, channels_last);
    let labels = targets.size()[1] as usize;
    Some(ValidationRecord::new(
        loss,
        &to_vec(&probs),
        &to_vec(&t),
        labels,
    ))
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
        .expect("floats")
}
