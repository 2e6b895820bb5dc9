//! Keras legacy HDF5 weights: reading (full-model files with `model_weights/`, weights-only files,
//! backbone-only "notop" files) and writing the weights-only layout that Keras'
//! `model.load_weights` reads back.
//!
//! A Keras layer `L` holds its tensors in `L/<weight name>`, listed in the group's `weight_names`
//! attribute (`stem_conv/kernel:0`, ...). The model keeps each tensor under
//! `L.<torch name>` (see [`torch_param_name`]), transposed to libtorch's layout.

use std::collections::BTreeSet;
use std::path::Path;

use hdf5::types::VarLenAscii;
use tch::{nn::VarStore, Tensor};

use super::arch::Arch;
use super::hdf5_safe;

/// Layer names of the head on top of the backbone, in order.
pub const HEAD_LAYERS: [&str; 3] = ["dense", "dense_1", "dense_2"];

/// What went wrong reading or applying a Keras file. Each message names the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum KerasError {
    #[error("{file}: not an HDF5 file or unreadable ({reason})")]
    Open { file: String, reason: String },
    #[error("{file}: not a Keras weights file: {reason}")]
    Layout { file: String, reason: String },
    #[error("{file}: tensor {tensor}: {reason}")]
    Tensor {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error("{file}: tensor {tensor} has shape {found:?}, the model expects {expected:?}")]
    Shape {
        file: String,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{file}: unexpected tensor {tensor}: the model has no such parameter (is this an EfficientNet tagger?)")]
    Unexpected { file: String, tensor: String },
    #[error("{file}: missing tensor {tensor} ({count} of the model's tensors are absent)")]
    Missing {
        file: String,
        tensor: String,
        count: usize,
    },
    #[error("{file}: holds {held} weights, not {model} (the model's variant)")]
    Variant {
        file: String,
        held: Arch,
        model: Arch,
    },
    #[error("{file}: cannot write: {reason}")]
    Write { file: String, reason: String },
}

/// How the file was laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KerasLayout {
    /// `model.save` / ModelCheckpoint: layers under `model_weights/`, optimizer state beside.
    FullModel,
    /// `model.save_weights`: layer groups at the root.
    WeightsOnly,
}

/// One tensor read from a Keras file.
#[derive(Clone, Debug)]
pub struct KerasTensor {
    /// `layer/weight:0` as in `weight_names` but with the file's layer group name in front.
    pub name: String,
    pub layer: String,
    /// The last component of the weight name without `:0` (`kernel`, `gamma`, ...).
    pub param: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The weights of a Keras file, in the file's layer order.
#[derive(Debug)]
pub struct KerasWeights {
    pub file: String,
    pub layout: KerasLayout,
    pub tensors: Vec<KerasTensor>,
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    pub layout: KerasLayout,
    /// The variant the file holds (that of the model it was loaded into).
    pub arch: Arch,
    /// Tensors copied into the model.
    pub applied: usize,
    /// False for a backbone-only file: the head keeps its initial values.
    pub head_loaded: bool,
    /// Renamings done to match the file's head layers to the model's (`dense_3 -> dense`).
    pub renamed: Vec<(String, String)>,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = match self.layout {
            KerasLayout::FullModel => "Keras full model",
            KerasLayout::WeightsOnly => "Keras weights",
        };
        write!(f, "{layout}")?;
        if !self.arch.is_b0() {
            write!(f, " of {}", self.arch)?;
        }
        write!(f, ": {} tensors loaded", self.applied)?;
        if !self.head_loaded {
            write!(
                f,
                " (backbone only; the dense head keeps its initial weights)"
            )?;
        }
        for (from, to) in &self.renamed {
            write!(f, "; layer {from} loaded as {to}")?;
        }
        Ok(())
    }
}

/// The libtorch name of a Keras parameter.
pub fn torch_param_name(param: &str) -> Option<&'static str> {
    Some(match param {
        "kernel" | "depthwise_kernel" | "gamma" => "weight",
        "bias" | "beta" => "bias",
        "moving_mean" => "running_mean",
        "moving_variance" => "running_var",
        _ => return None,
    })
}

/// The Keras parameter name of a libtorch parameter of the given layer.
fn keras_param_name(layer: &str, torch: &str) -> &'static str {
    let is_bn = layer.ends_with("_bn");
    match (torch, is_bn) {
        ("weight", true) => "gamma",
        ("bias", true) => "beta",
        ("running_mean", _) => "moving_mean",
        ("running_var", _) => "moving_variance",
        ("weight", false) if layer.ends_with("_dwconv") => "depthwise_kernel",
        ("weight", false) => "kernel",
        _ => "bias",
    }
}

/// The order of a Keras tensor's dimensions in libtorch's layout, where it differs.
fn keras_to_torch_order(param: &str, rank: usize) -> Option<&'static [usize]> {
    match (param, rank) {
        // (kh, kw, in, out) -> (out, in, kh, kw)
        ("kernel", 4) => Some(&[3, 2, 0, 1]),
        // (kh, kw, channels, 1) -> (channels, 1, kh, kw)
        ("depthwise_kernel", 4) => Some(&[2, 3, 0, 1]),
        // (in, out) -> (out, in)
        ("kernel", 2) => Some(&[1, 0]),
        _ => None,
    }
}

/// Permutation taking a Keras tensor to libtorch's layout (and its inverse for export).
fn keras_to_torch(t: &Tensor, param: &str) -> Tensor {
    match keras_to_torch_order(param, t.dim()) {
        Some(order) => {
            let order: Vec<i64> = order.iter().map(|&i| i as i64).collect();
            t.permute(order)
        }
        None => t.shallow_clone(),
    }
}

fn torch_to_keras(t: &Tensor, param: &str) -> Tensor {
    match (param, t.dim()) {
        ("kernel", 4) => t.permute([2, 3, 1, 0]),
        ("depthwise_kernel", 4) => t.permute([2, 3, 0, 1]),
        ("kernel", 2) => t.transpose(0, 1),
        _ => t.shallow_clone(),
    }
}

/// Most values one tensor of a file read without a model may hold (an EfficientNet-B7's largest
/// tensor has under 2 million), and all of them together.
pub const MAX_TENSOR_VALUES: usize = 1 << 26;
pub const MAX_FILE_VALUES: usize = 1 << 28;
/// Most tensors a file may list (a B0 has 315; layers sharing one group through hard links could
/// otherwise list the same names millions of times).
pub const MAX_TENSORS: usize = 100_000;

/// A Keras file opened and listed: every tensor's name and shape (no values yet) and where its
/// dataset is, through hard links only.
struct Listing {
    file: hdf5::File,
    weights: KerasWeights,
    datasets: Vec<String>,
}

/// Opens a Keras file and lists its tensors: names bounded in count and length, every link
/// resolved inside the file, every dataset's storage checked to be in the file. No values are
/// read.
fn list(path: &Path) -> Result<Listing, KerasError> {
    let file_name = path.display().to_string();
    let layout_err = |reason: String| KerasError::Layout {
        file: file_name.clone(),
        reason,
    };
    if !path.is_file() {
        return Err(KerasError::Open {
            file: file_name,
            reason: "no such file".into(),
        });
    }
    let file = hdf5::File::open(path).map_err(|e| KerasError::Open {
        file: file_name.clone(),
        reason: open_failure(&e.to_string()),
    })?;
    let full = hdf5_safe::resolve(&file, "model_weights")
        .map_err(layout_err)?
        .filter(|p| file.group(p).is_ok());
    let (root_path, layout) = match full {
        Some(p) => (p, KerasLayout::FullModel),
        None => ("/".to_string(), KerasLayout::WeightsOnly),
    };
    let root = file
        .group(&root_path)
        .map_err(|e| layout_err(e.to_string()))?;
    let layer_names = root
        .attr("layer_names")
        .map_err(|e| e.to_string())
        .and_then(|a| hdf5_safe::read_names(&a))
        .map_err(|e| layout_err(format!("no readable layer_names attribute ({e})")))?;
    let mut weights = KerasWeights {
        file: file_name.clone(),
        layout,
        tensors: Vec::new(),
    };
    let mut datasets = Vec::new();
    for layer in layer_names {
        let (group_path, group) = hdf5_safe::resolve(
            &file,
            &format!("{}/{layer}", root_path.trim_end_matches('/')),
        )
        .and_then(|p| p.ok_or_else(|| "no such group".to_string()))
        .and_then(|p| Ok((p.clone(), file.group(&p).map_err(|e| e.to_string())?)))
        .map_err(|e| layout_err(format!("layer {layer} is listed but has no group ({e})")))?;
        let weight_names = group
            .attr("weight_names")
            .map_err(|e| e.to_string())
            .and_then(|a| hdf5_safe::read_names(&a))
            .map_err(|e| layout_err(format!("layer {layer} has no readable weight_names ({e})")))?;
        if weights.tensors.len() + weight_names.len() > MAX_TENSORS {
            return Err(layout_err(format!(
                "it lists more than {MAX_TENSORS} tensors"
            )));
        }
        for weight in weight_names {
            let (tensor, dataset) = locate(&file, &file_name, &group_path, &layer, &weight)?;
            weights.tensors.push(tensor);
            datasets.push(dataset);
        }
    }
    if weights.tensors.is_empty() {
        return Err(layout_err("it holds no weight tensors".into()));
    }
    Ok(Listing {
        file,
        weights,
        datasets,
    })
}

/// The tensor `weight` of `layer` (no values yet) and the path of its dataset, found through
/// links that stay in the file, once its storage is checked (in the file, floats, known
/// filters).
fn locate(
    file: &hdf5::File,
    file_name: &str,
    group_path: &str,
    layer: &str,
    weight: &str,
) -> Result<(KerasTensor, String), KerasError> {
    let name = format!("{layer}/{weight}");
    let found = hdf5_safe::resolve(file, &format!("{group_path}/{weight}"))
        .and_then(|p| p.ok_or_else(|| "no such dataset".to_string()))
        .and_then(|p| {
            let ds = file.dataset(&p).map_err(|e| e.to_string())?;
            Ok((p, hdf5_safe::storage(&ds)?.shape))
        });
    let (dataset, shape) = found.map_err(|reason| KerasError::Tensor {
        file: file_name.to_string(),
        tensor: name.clone(),
        reason,
    })?;
    let last = weight.rsplit('/').next().unwrap_or(weight);
    let param = last.split(':').next().unwrap_or(last).to_string();
    let tensor = KerasTensor {
        name,
        layer: layer.to_string(),
        param,
        shape,
        data: Vec::new(),
    };
    Ok((tensor, dataset))
}

/// Reads the values of every listed tensor, each at most `limit` values.
fn read_values(listing: Listing, limit: usize) -> Result<KerasWeights, KerasError> {
    let Listing {
        file,
        mut weights,
        datasets,
    } = listing;
    let mut total = 0usize;
    for (t, path) in weights.tensors.iter_mut().zip(&datasets) {
        let err = |reason: String| KerasError::Tensor {
            file: weights.file.clone(),
            tensor: t.name.clone(),
            reason,
        };
        let n = hdf5_safe::elements(&t.shape).unwrap_or(usize::MAX);
        total = total.saturating_add(n);
        if n > limit || total > MAX_FILE_VALUES {
            return Err(err(format!(
                "shape {:?} is larger than any tensor of the model",
                t.shape
            )));
        }
        let ds = file.dataset(path).map_err(|e| err(e.to_string()))?;
        let storage = hdf5_safe::storage(&ds).map_err(err)?;
        if storage.shape != t.shape {
            return Err(err("its shape changed while reading".into()));
        }
        t.data = hdf5_safe::read_f32(&ds, &storage).map_err(err)?;
    }
    Ok(weights)
}

/// Reads every weight tensor of a Keras legacy HDF5 file, each of at most
/// [`MAX_TENSOR_VALUES`] values. Nothing outside the file is read.
pub fn read(path: &Path) -> Result<KerasWeights, KerasError> {
    read_values(list(path)?, MAX_TENSOR_VALUES)
}

/// The file's head layers renamed to the model's, when the file names them differently (a Keras
/// session that built several models numbers its Dense layers `dense_3`, `dense_4`, ...): its
/// layers with a 2-D kernel, in file order, become `dense`, `dense_1`, `dense_2`.
fn head_renaming(weights: &KerasWeights) -> Vec<(String, String)> {
    let dense: Vec<&str> = weights
        .tensors
        .iter()
        .filter(|t| t.param == "kernel" && t.shape.len() == 2)
        .map(|t| t.layer.as_str())
        .collect();
    if dense.len() != HEAD_LAYERS.len() || dense.iter().zip(HEAD_LAYERS).all(|(a, b)| *a == b) {
        return Vec::new();
    }
    dense
        .iter()
        .zip(HEAD_LAYERS)
        .filter(|(a, b)| **a != *b)
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// What [`check`] found: each tensor's VarStore key (in file order), the head renaming and
/// whether the head is in the file.
struct Plan {
    keys: Vec<String>,
    renamed: Vec<(String, String)>,
    head_loaded: bool,
}

/// A tensor's shape in libtorch's layout (see [`keras_to_torch`]).
fn torch_shape(shape: &[usize], param: &str) -> Vec<i64> {
    let dims: Vec<i64> = shape
        .iter()
        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
        .collect();
    match keras_to_torch_order(param, dims.len()) {
        Some(order) => order.iter().map(|&i| dims[i]).collect(),
        None => dims,
    }
}

/// The variant whose backbone a file's tensors describe: the one whose block names differ least
/// from the file's (`block1a`, ...), then whose stem and top widths match (B1 and B2 have the
/// same blocks). A damaged file is taken for the variant it is closest to, so what is wrong with
/// it is then named against that variant's tensors.
pub fn recognise(weights: &KerasWeights) -> Arch {
    let blocks: BTreeSet<&str> = weights
        .tensors
        .iter()
        .filter(|t| t.layer.starts_with("block"))
        .filter_map(|t| t.layer.split('_').next())
        .collect();
    let out_channels = |layer: &str| {
        weights
            .tensors
            .iter()
            .find(|t| t.layer == layer && t.param == "kernel")
            .and_then(|t| t.shape.last().copied())
    };
    let (stem, top) = (out_channels("stem_conv"), out_channels("top_conv"));
    let distance = |arch: &Arch| {
        let net = arch.network();
        let names = net.block_names();
        let missing = names
            .iter()
            .filter(|n| !blocks.contains(n.as_str()))
            .count();
        let extra = blocks
            .iter()
            .filter(|b| !names.iter().any(|n| n == *b))
            .count();
        let widths = [(stem, net.stem_filters), (top, net.top_filters)]
            .iter()
            .filter(|(found, want)| *found != usize::try_from(*want).ok())
            .count();
        (missing + extra, widths)
    };
    // The first of equals: B0 for a file that fits nothing.
    Arch::ALL
        .into_iter()
        .min_by_key(distance)
        .unwrap_or_default()
}

/// The variant a Keras file holds (see [`recognise`]), from its tensors' names and shapes; no
/// values are read.
pub fn variant(path: &Path) -> Result<Arch, KerasError> {
    Ok(recognise(&list(path)?.weights))
}

/// Checks Keras tensors (their names and shapes only) against a model of variant `arch`: the
/// file must hold that variant, every tensor must be a parameter of the model with its shape,
/// none twice, none missing (but the whole head, for a backbone-only file).
fn check(weights: &KerasWeights, vs: &VarStore, arch: Arch) -> Result<Plan, KerasError> {
    let held = recognise(weights);
    if held != arch {
        return Err(KerasError::Variant {
            file: weights.file.clone(),
            held,
            model: arch,
        });
    }
    let vars = vs.variables();
    let renamed = head_renaming(weights);
    let rename = |layer: &str| -> String {
        renamed
            .iter()
            .find(|(from, _)| from == layer)
            .map(|(_, to)| to.clone())
            .unwrap_or_else(|| layer.to_string())
    };
    let mut keys = Vec::with_capacity(weights.tensors.len());
    let mut seen = BTreeSet::new();
    for t in &weights.tensors {
        let unexpected = || KerasError::Unexpected {
            file: weights.file.clone(),
            tensor: t.name.clone(),
        };
        let torch = torch_param_name(&t.param).ok_or_else(unexpected)?;
        let key = format!("{}.{torch}", rename(&t.layer));
        let var = vars.get(&key).ok_or_else(unexpected)?;
        if torch_shape(&t.shape, &t.param) != var.size() {
            let expected = torch_to_keras(&var.zeros_like(), &t.param).size();
            return Err(KerasError::Shape {
                file: weights.file.clone(),
                tensor: t.name.clone(),
                found: t.shape.clone(),
                expected: expected.iter().map(|&d| d as usize).collect(),
            });
        }
        if !seen.insert(key.clone()) {
            return Err(KerasError::Tensor {
                file: weights.file.clone(),
                tensor: t.name.clone(),
                reason: "appears twice".into(),
            });
        }
        keys.push(key);
    }
    let is_head = |key: &str| {
        HEAD_LAYERS
            .iter()
            .any(|h| key.split('.').next() == Some(*h))
    };
    let head_loaded = seen.iter().any(|k| is_head(k));
    let missing: Vec<&String> = vars
        .keys()
        .filter(|k| !seen.contains(*k) && (head_loaded || !is_head(k)))
        .collect();
    let first_missing = keras_layers(vs, arch)
        .into_iter()
        .flat_map(|(layer, params)| {
            params
                .into_iter()
                .map(move |(p, key)| (format!("{layer}/{p}:0"), key))
        })
        .find(|(_, key)| missing.contains(&key))
        // A variable of no Keras layer (none today; the model was built for another variant).
        .or_else(|| missing.iter().min().map(|k| (k.to_string(), String::new())));
    if let Some((tensor, _)) = first_missing {
        return Err(KerasError::Missing {
            file: weights.file.clone(),
            tensor,
            count: missing.len(),
        });
    }
    Ok(Plan {
        keys,
        renamed,
        head_loaded,
    })
}

/// Copies Keras weights into a model's VarStore of variant `arch`. Refuses a file of another
/// variant, with a tensor the model lacks, a tensor of the wrong shape or a missing tensor; a file
/// without any head tensor (a backbone-only "notop" file) leaves the head as it is.
pub fn apply(
    weights: &KerasWeights,
    vs: &VarStore,
    arch: Arch,
) -> Result<ImportReport, KerasError> {
    // Check everything before touching the model, so a refused file leaves it unchanged.
    let plan = check(weights, vs, arch)?;
    let vars = vs.variables();
    let mut values = Vec::with_capacity(plan.keys.len());
    for (t, key) in weights.tensors.iter().zip(&plan.keys) {
        if hdf5_safe::elements(&t.shape) != Some(t.data.len()) {
            return Err(KerasError::Tensor {
                file: weights.file.clone(),
                tensor: t.name.clone(),
                reason: format!("{} values for a shape of {:?}", t.data.len(), t.shape),
            });
        }
        let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let value = keras_to_torch(&Tensor::from_slice(&t.data).reshape(&dims), &t.param);
        values.push((key, value));
    }
    tch::no_grad(|| {
        for (key, value) in &values {
            let mut var = vars[*key].shallow_clone();
            var.copy_(&value.to_kind(var.kind()).to_device(var.device()));
        }
    });
    Ok(ImportReport {
        layout: weights.layout,
        arch,
        applied: plan.keys.len(),
        head_loaded: plan.head_loaded,
        renamed: plan.renamed,
    })
}

/// Reads a Keras file and applies it to the model of variant `arch` (see [`apply`]). Every
/// tensor's name and shape is checked against the model before any value is read, so a file
/// claiming a huge tensor is refused without reading it.
pub fn load(path: &Path, vs: &VarStore, arch: Arch) -> Result<ImportReport, KerasError> {
    let listing = list(path)?;
    check(&listing.weights, vs, arch)?;
    apply(&read_values(listing, MAX_TENSOR_VALUES)?, vs, arch)
}

/// The model's layers in the order the Keras original creates them (the order of its
/// `layer_names`), each with `(keras param, VarStore key)` pairs in Keras weight order. Layers the
/// VarStore lacks (`block1a` has no expansion) are left out.
pub fn keras_layers(vs: &VarStore, arch: Arch) -> Vec<(String, Vec<(String, String)>)> {
    let vars = vs.variables();
    let mut names = vec!["stem_conv".to_string(), "stem_bn".to_string()];
    for block in arch.network().block_names() {
        for part in [
            "expand_conv",
            "expand_bn",
            "dwconv",
            "bn",
            "se_reduce",
            "se_expand",
            "project_conv",
            "project_bn",
        ] {
            names.push(format!("{block}_{part}"));
        }
    }
    names.extend(["top_conv", "top_bn"].map(String::from));
    names.extend(HEAD_LAYERS.map(String::from));
    let params = ["weight", "bias", "running_mean", "running_var"];
    names
        .into_iter()
        .filter_map(|layer| {
            let present: Vec<(String, String)> = params
                .iter()
                .map(|p| format!("{layer}.{p}"))
                .filter(|key| vars.contains_key(key))
                .map(|key| {
                    let torch = key.split_once('.').map(|(_, t)| t).unwrap_or("");
                    (keras_param_name(&layer, torch).to_string(), key)
                })
                .collect();
            (!present.is_empty()).then_some((layer, present))
        })
        .collect()
}

/// Every layer name of the original Keras model, in its `layer_names` order (weightless layers
/// included), as `model.save_weights` writes them.
pub fn original_layer_names(arch: Arch) -> Vec<String> {
    let mut names: Vec<String> = ["input_1", "stem_conv", "stem_bn", "stem_activation"]
        .map(String::from)
        .to_vec();
    for block in &arch.network().blocks {
        let mut parts = Vec::new();
        if block.expand_ratio != 1 {
            parts.extend(["expand_conv", "expand_bn", "expand_activation"]);
        }
        parts.extend([
            "dwconv",
            "bn",
            "activation",
            "se_squeeze",
            "se_reshape",
            "se_reduce",
            "se_expand",
            "se_excite",
            "project_conv",
            "project_bn",
        ]);
        // Keras drops before the residual add where the block's drop-connect rate is above 0.
        if block.residual() {
            if block.index > 0 {
                parts.push("drop");
            }
            parts.push("add");
        }
        names.extend(parts.iter().map(|p| format!("{}_{p}", block.name)));
    }
    names.extend(
        [
            "top_conv",
            "top_bn",
            "top_activation",
            "global_average_pooling2d",
        ]
        .map(String::from),
    );
    names.extend(HEAD_LAYERS.map(String::from));
    names
}

/// HDF5's reason for a failed open, with what to do when the file is locked: HDF5 takes a
/// `flock` on every file it opens, held by a writer still running (or a process that inherited
/// its descriptor), and refused on some network filesystems.
fn open_failure(reason: &str) -> String {
    if reason.contains("unable to lock file") {
        format!(
            "{reason}; another process holds it open for writing (wait for it to finish), or \
             the filesystem does not support locks (set HDF5_USE_FILE_LOCKING=FALSE)"
        )
    } else {
        reason.to_string()
    }
}

/// Writes the model as a Keras legacy HDF5 weights file, the layout of `model.save_weights`:
/// `layer_names` at the root, one group per layer with its `weight_names`, tensors in Keras
/// layout. The original `multiinference.py` loads it with `model.load_weights`. Written to a
/// temporary file and renamed into place. `arch` is the model's variant (its blocks' layers).
pub fn save_weights(vs: &VarStore, arch: Arch, path: &Path) -> anyhow::Result<()> {
    let vars = vs.variables();
    let layers: std::collections::HashMap<String, Vec<(String, String)>> =
        keras_layers(vs, arch).into_iter().collect();
    let write = |tmp: &Path| -> hdf5::Result<()> {
        let file = hdf5::File::create(tmp)?;
        let ascii =
            |s: &str| VarLenAscii::from_ascii(s).map_err(|e| hdf5::Error::from(e.to_string()));
        let scalar = |name: &str, value: &str| -> hdf5::Result<()> {
            file.new_attr::<VarLenAscii>()
                .create(name)?
                .write_scalar(&ascii(value)?)
        };
        scalar("backend", "tensorflow")?;
        scalar("keras_version", "2.15.0")?;
        let names = original_layer_names(arch);
        let name_values = names
            .iter()
            .map(|n| ascii(n))
            .collect::<hdf5::Result<Vec<_>>>()?;
        file.new_attr::<VarLenAscii>()
            .shape(names.len())
            .create("layer_names")?
            .write_raw(&name_values)?;
        for layer in &names {
            let group = file.create_group(layer)?;
            let Some(params) = layers.get(layer) else {
                group.new_attr::<f64>().shape(0).create("weight_names")?;
                continue;
            };
            let weight_names: Vec<String> = params
                .iter()
                .map(|(p, _)| format!("{layer}/{p}:0"))
                .collect();
            let values = weight_names
                .iter()
                .map(|n| ascii(n))
                .collect::<hdf5::Result<Vec<_>>>()?;
            group
                .new_attr::<VarLenAscii>()
                .shape(values.len())
                .create("weight_names")?
                .write_raw(&values)?;
            let inner = group.create_group(layer)?;
            for (param, key) in params {
                let t = torch_to_keras(
                    &vars[key]
                        .to_device(tch::Device::Cpu)
                        .to_kind(tch::Kind::Float),
                    param,
                )
                .contiguous();
                let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                let data = Vec::<f32>::try_from(t.flatten(0, -1))
                    .map_err(|e| hdf5::Error::from(e.to_string()))?;
                inner
                    .new_dataset::<f32>()
                    .shape(shape)
                    .create(format!("{param}:0").as_str())?
                    .write_raw(&data)?;
            }
        }
        file.flush()?;
        Ok(())
    };
    crate::fsutil::write_atomic_path(path, |tmp| {
        write(tmp).map_err(|e| {
            KerasError::Write {
                file: path.display().to_string(),
                reason: e.to_string(),
            }
            .into()
        })
    })
}
