//! The learner's state: the model being trained, its optimizer and the weights that are
//! validated (the moving average or precise-BN copy), built from the seed, `--init` (a Keras file
//! of the run's variant or a checkpoint) or the checkpoint a run resumes from.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::nn::ModuleT;
use tch::{nn, Device, Tensor};

use super::adam::Adam;
use super::settings::FitSettings;
use super::shadow::{self, Shadow};
use crate::data::preprocess;
use crate::data::taxonomy::Taxonomy;
use crate::model::arch::Arch;
use crate::model::checkpoint::{self, Checkpoint};
use crate::model::efficientnet::{Tagger, TaggerConfig};
use crate::model::precision;
use crate::model::{is_hdf5, keras};
use crate::say;

/// Loads `--init`: a Keras HDF5 file (full, weights-only or backbone-only) or one of our
/// checkpoints with the same labels.
fn load_init(path: &Path, vs: &nn::VarStore, taxonomy: &Taxonomy, arch: Arch) -> Result<String> {
    if !path.is_file() {
        bail!("--init {}: no such file", path.display());
    }
    if is_hdf5(path) {
        let context = || format!("--init {}", path.display());
        let held = keras::variant(path).with_context(context)?;
        if held != arch {
            bail!(
                "--init {}: the Keras file holds {held} weights, not {arch} (--arch)",
                path.display()
            );
        }
        let report = keras::load(path, vs, arch).with_context(context)?;
        return Ok(report.to_string());
    }
    let ckpt = Checkpoint::read(path).with_context(|| format!("--init {}", path.display()))?;
    if ckpt.meta.arch != arch {
        bail!(
            "--init {}: a {} checkpoint; this run builds {arch}",
            path.display(),
            ckpt.meta.arch
        );
    }
    if ckpt.meta.taxonomy.labels != taxonomy.labels {
        bail!(
            "--init {}: its labels ({}) differ from this dataset's ({})",
            path.display(),
            ckpt.meta.taxonomy.labels.join(", "),
            taxonomy.labels.join(", ")
        );
    }
    ckpt.load_model(vs, path)?;
    Ok(format!("trainer checkpoint, epoch {}", ckpt.meta.epoch))
}

/// The model being trained, its optimizer, and the weights that are validated when the recipe
/// makes them differ from the trained ones.
pub struct Model {
    pub vs: nn::VarStore,
    pub net: Tagger,
    pub adam: Adam,
    /// The moving average or precise-BN copy (with drop-connect off) that is validated,
    /// checkpointed as the model and exported.
    pub shadow: Option<(Shadow, Tagger)>,
}

impl Model {
    /// The weights that are validated, checkpointed as the model and exported.
    pub fn used(&self) -> (&nn::VarStore, &Tagger) {
        match &self.shadow {
            Some((s, net)) => (&s.vs, net),
            None => (&self.vs, &self.net),
        }
    }

    /// The optimizer's state, and the trained weights where the model's are others, for a
    /// checkpoint.
    pub fn extra_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = self.adam.state();
        if self.shadow.is_some() {
            state.extend(
                self.vs
                    .variables()
                    .into_iter()
                    .map(|(k, t)| (format!("{}{k}", checkpoint::TRAINED), t)),
            );
        }
        state
    }
}

/// The model (from the previous checkpoint, `--init` or the seed) in the run's memory format, and
/// Adam with its moments made after the layout change, so each has its parameter's strides (the
/// multi-tensor kernels keep their fast path only with one layout across the lists).
pub fn model_and_optimizer(
    settings: &FitSettings,
    taxonomy: &Taxonomy,
    previous: Option<(&Checkpoint, &Path)>,
    device: Device,
    rank0: bool,
) -> Result<Model> {
    // The initial weights of what --init does not set come from the seed.
    tch::manual_seed(settings.seed as i64);
    let vs = nn::VarStore::new(device);
    let config = TaggerConfig {
        num_classes: taxonomy.labels.len() as i64,
        drop_connect: settings.drop_connect,
        arch: settings.arch,
    };
    let net = Tagger::new(&vs.root(), config);
    let uses_shadow = settings.recipe.ema.is_some() || settings.recipe.precise_bn > 0;
    // Only rank 0 validates and writes, so only it keeps the used weights.
    let keeps_shadow = uses_shadow && rank0;
    if let Some((prev, file)) = previous {
        match uses_shadow {
            true => prev.load_prefixed(&vs, checkpoint::TRAINED, file)?,
            false => prev.load_model(&vs, file)?,
        }
    } else if let Some(init) = &settings.init {
        let report = load_init(init, &vs, taxonomy, settings.arch)?;
        say!("init: {report}");
    } else if settings.arch.is_b0() {
        say!(
            "warning: training from random weights; to start from ImageNet, pass --init with the Keras EfficientNet-B0 \"notop\" file (efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5)"
        );
    } else {
        say!("warning: training {} from random weights", settings.arch);
    }
    if settings.channels_last {
        precision::vars_to_channels_last(&vs);
    }
    let shadow = match keeps_shadow {
        true => {
            let svs = nn::VarStore::new(device);
            let snet = Tagger::new(
                &svs.root(),
                TaggerConfig {
                    drop_connect: 0.0,
                    ..config
                },
            );
            if settings.channels_last {
                precision::vars_to_channels_last(&svs);
            }
            let shadow = Shadow::new(svs, &vs);
            if let Some((prev, file)) = previous {
                prev.load_model(&shadow.vs, file)?;
            }
            Some((shadow, snet))
        }
        false => None,
    };
    let mut adam = Adam::new(&vs, settings.lr);
    if settings.cuda_graphs {
        // The step count and learning rate on the device, where a replayed step reads them.
        adam.kernel = super::adam::Kernel::Capturable;
    } else if device.is_cuda() {
        // One kernel launch for every parameter instead of six multi-tensor ones.
        adam.kernel = super::adam::Kernel::Fused;
    }
    if let Some((prev, _)) = previous {
        adam.load_state(prev.meta.optimizer_step, |k| {
            prev.tensors.get(k).map(|t| t.to_device(device))
        })?;
    }
    Ok(Model {
        vs,
        net,
        adam,
        shadow,
    })
}

/// Brings the used weights up to date at the end of an epoch: the shadow copy (without EMA) and
/// the precise batch-norm statistics over the first `--precise-bn` images of the epoch's order,
/// without augmentation.
pub fn update_used_weights(model: &Model, settings: &FitSettings, pixels: &Tensor, order: &Tensor) {
    let Some((shadow, net)) = &model.shadow else {
        return;
    };
    if settings.recipe.ema.is_none() {
        shadow.copy();
    }
    let images = settings.recipe.precise_bn.min(order.size()[0] as usize) as i64;
    if images == 0 {
        return;
    }
    let bs = settings.batch_size as i64;
    let device = order.device();
    let batches = (0..images).step_by(bs as usize).map(|start| {
        let ids = order.narrow(0, start, bs.min(images - start));
        let px = pixels.index_select(0, &ids.to_device(pixels.device()));
        precision::layout(
            &preprocess::to_input(&px.to_device(device)),
            settings.channels_last,
        )
    });
    shadow::precise_bn(
        &shadow.vs,
        crate::model::efficientnet::BN_MOMENTUM,
        batches,
        |x| {
            let _ = net.forward_t(x, true);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::Augment;
    use crate::model::precision::Precision;

    #[test]
    fn adam_moments_have_their_parameters_strides_in_channels_last() {
        let settings = FitSettings {
            data: "data".into(),
            taxonomy: None,
            weights_dir: "w".into(),
            seed: 1,
            val_fraction: 0.1,
            augment: Augment::None,
            image_size: 64,
            lr: 1e-4,
            batch_size: 4,
            epochs: 1,
            drop_connect: 0.2,
            init: None,
            precision: Precision::Fp32,
            channels_last: true,
            recipe: Default::default(),
            accumulate: 1,
            cache_dir: None,
            arch: Default::default(),
            loss: Default::default(),
            best_by: Default::default(),
            tensorboard: false,
            cuda_graphs: false,
        };
        let Model { vs, adam, .. } =
            model_and_optimizer(&settings, &Taxonomy::ndl(), None, Device::Cpu, true).unwrap();
        let state: std::collections::HashMap<String, Tensor> = adam.state().into_iter().collect();
        let vars = vs.variables();
        let stem = &vars["stem_conv.weight"];
        assert_eq!(
            stem.stride(),
            [27, 1, 9, 3],
            "the stem kernel is channels-last"
        );
        for (name, p) in &vars {
            if !p.requires_grad() {
                continue;
            }
            for kind in ["m", "v"] {
                let moment = &state[&format!("adam.{kind}.{name}")];
                assert_eq!(moment.stride(), p.stride(), "adam.{kind}.{name}");
            }
        }
    }
}
