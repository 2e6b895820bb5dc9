//! The tagger as an ONNX graph (opset 17), written from Rust with the ONNX protobuf messages:
//! input `images` (uint8, as `cv2.imread` + `cv2.resize` give them), the preprocessing of
//! `data::preprocess` (scaling and layout change) inside, batch-norm folded into the
//! convolutions, output `probabilities` (float32, [N, labels]). Labels, thresholds and the
//! preprocessing are in the model's `metadata_props`.

use std::collections::HashMap;

use anyhow::{Context, Result};
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use tch::{nn::VarStore, Kind, Tensor};

use super::arch::{Arch, BlockSpec};
use super::efficientnet::{same_padding, BN_EPS};
use crate::data::preprocess;

pub const OPSET: i64 = 17;

/// What goes into the model's metadata.
pub struct Metadata<'a> {
    pub labels: &'a [String],
    pub thresholds: &'a [f32],
    pub image_size: usize,
    /// The variant whose blocks the graph walks (not written into the graph's metadata).
    pub arch: Arch,
}

/// A float variable of the VarStore: values (contiguous, row-major) and shape.
fn var(vars: &HashMap<String, Tensor>, name: &str) -> Result<(Vec<f32>, Vec<i64>)> {
    let t = vars
        .get(name)
        .with_context(|| format!("the model has no variable {name}"))?;
    let t = t.to_kind(Kind::Float).contiguous();
    let shape = t.size();
    Ok((Vec::<f32>::try_from(t.flatten(0, -1))?, shape))
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

fn value_info(name: &str, elem: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        match d {
            Some(v) => dim.set_dim_value(*v),
            None => dim.set_dim_param("N".into()),
        }
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem as i32;
    tensor.shape = Some(shape).into();
    let mut tp = TypeProto::new();
    tp.set_tensor_type(tensor);
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(tp).into();
    v
}

/// Builds the graph node by node; names are unique by construction.
struct Builder {
    graph: GraphProto,
    counter: usize,
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        let out = self.fresh(hint);
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = format!("{hint}/{op}_{}", self.counter);
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![out.clone()];
        n.attribute = attrs;
        self.graph.node.push(n);
        out
    }

    fn float_init(&mut self, name: &str, values: Vec<f32>, dims: &[i64]) -> String {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = DataType::FLOAT as i32;
        t.dims = dims.to_vec();
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(t);
        name.into()
    }

    fn int_init(&mut self, name: &str, values: &[i64]) -> String {
        let mut t = TensorProto::new();
        t.name = name.into();
        t.data_type = DataType::INT64 as i32;
        t.dims = vec![values.len() as i64];
        t.int64_data = values.to_vec();
        self.graph.initializer.push(t);
        name.into()
    }

    fn silu(&mut self, x: &str, hint: &str) -> String {
        let s = self.node("Sigmoid", &[x], vec![], hint);
        self.node("Mul", &[x, &s], vec![], hint)
    }

    /// A TensorFlow "same" convolution (zero padding split as TF does for stride 2) with the
    /// batch-norm `bn` (if any) folded into its kernel and bias. `size` is the input's spatial
    /// size; returns the output and its size.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        vars: &HashMap<String, Tensor>,
        x: &str,
        conv: &str,
        bn: Option<&str>,
        stride: i64,
        groups: i64,
        size: i64,
    ) -> Result<(String, i64)> {
        let (mut w, shape) = var(vars, &format!("{conv}.weight"))?;
        let (c_out, k) = (shape[0], shape[2]);
        let per_out = w.len() / c_out as usize;
        let mut b = match vars.contains_key(&format!("{conv}.bias")) {
            true => var(vars, &format!("{conv}.bias"))?.0,
            false => vec![0.0; c_out as usize],
        };
        if let Some(bn) = bn {
            let (gamma, _) = var(vars, &format!("{bn}.weight"))?;
            let (beta, _) = var(vars, &format!("{bn}.bias"))?;
            let (mean, _) = var(vars, &format!("{bn}.running_mean"))?;
            let (variance, _) = var(vars, &format!("{bn}.running_var"))?;
            for o in 0..c_out as usize {
                let scale = (gamma[o] as f64 / (variance[o] as f64 + BN_EPS).sqrt()) as f32;
                for v in &mut w[o * per_out..(o + 1) * per_out] {
                    *v *= scale;
                }
                b[o] = (b[o] - mean[o]) * scale + beta[o];
            }
        }
        let wn = self.float_init(&format!("{conv}.kernel"), w, &shape);
        let bn_name = self.float_init(&format!("{conv}.bias_folded"), b, &[c_out]);
        let (input, pads) = if stride == 1 {
            (x.to_string(), vec![k / 2; 4])
        } else {
            let (top, bottom) = same_padding(size, k, stride);
            let p = self.int_init(
                &format!("{conv}.pads"),
                &[0, 0, top, top, 0, 0, bottom, bottom],
            );
            (self.node("Pad", &[x, &p], vec![], conv), vec![0; 4])
        };
        let out = self.node(
            "Conv",
            &[&input, &wn, &bn_name],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[stride, stride]),
                attr_ints("pads", &pads),
                attr_int("group", groups),
            ],
            conv,
        );
        Ok((out, (size + stride - 1) / stride))
    }

    /// One mobile inverted bottleneck block (`size`: the input's spatial size); returns the
    /// output and its size.
    fn block(
        &mut self,
        vars: &HashMap<String, Tensor>,
        x: &str,
        spec: &BlockSpec,
        size: i64,
    ) -> Result<(String, i64)> {
        let name = &spec.name;
        let mut y = x.to_string();
        if spec.expand_ratio != 1 {
            let e = format!("{name}_expand_conv");
            let bn = format!("{name}_expand_bn");
            let (e, _) = self.conv(vars, &y, &e, Some(&bn), 1, 1, size)?;
            y = self.silu(&e, name);
        }
        let (d, out_size) = self.conv(
            vars,
            &y,
            &format!("{name}_dwconv"),
            Some(&format!("{name}_bn")),
            spec.stride,
            spec.expanded_filters(),
            size,
        )?;
        y = self.silu(&d, name);
        let pooled = self.node("GlobalAveragePool", &[&y], vec![], name);
        let (r1, _) = self.conv(vars, &pooled, &format!("{name}_se_reduce"), None, 1, 1, 1)?;
        let r1 = self.silu(&r1, name);
        let (r2, _) = self.conv(vars, &r1, &format!("{name}_se_expand"), None, 1, 1, 1)?;
        let gate = self.node("Sigmoid", &[&r2], vec![], name);
        y = self.node("Mul", &[&y, &gate], vec![], name);
        let (p, _) = self.conv(
            vars,
            &y,
            &format!("{name}_project_conv"),
            Some(&format!("{name}_project_bn")),
            1,
            1,
            out_size,
        )?;
        let out = match spec.residual() {
            true => self.node("Add", &[&p, x], vec![], name),
            false => p,
        };
        Ok((out, out_size))
    }

    /// [`preprocess::to_input`] as nodes: cast to float, division by [`preprocess::DIVISOR`],
    /// NHWC to NCHW.
    fn preprocess(&mut self, images: &str) -> String {
        let x = self.node(
            "Cast",
            &[images],
            vec![attr_int("to", DataType::FLOAT as i64)],
            "input",
        );
        let k = self.float_init("input.scale", vec![preprocess::DIVISOR as f32], &[]);
        let x = self.node("Div", &[&x, &k], vec![], "input");
        self.node(
            "Transpose",
            &[&x],
            vec![attr_ints("perm", &preprocess::NHWC_TO_NCHW)],
            "input",
        )
    }

    fn dense(&mut self, vars: &HashMap<String, Tensor>, x: &str, name: &str) -> Result<String> {
        let (w, shape) = var(vars, &format!("{name}.weight"))?;
        let (b, bshape) = var(vars, &format!("{name}.bias"))?;
        let wn = self.float_init(&format!("{name}.weight"), w, &shape);
        let bn = self.float_init(&format!("{name}.bias"), b, &bshape);
        Ok(self.node("Gemm", &[x, &wn, &bn], vec![attr_int("transB", 1)], name))
    }
}

/// The ONNX model of the tagger whose variables are in `vs`, for square inputs of `meta.image_size`.
pub fn export(vs: &VarStore, meta: &Metadata) -> Result<Vec<u8>> {
    let vars = vs.variables();
    let mut b = Builder {
        graph: GraphProto::new(),
        counter: 0,
    };
    b.graph.name = "ndl_tagger".into();
    let s = meta.image_size as i64;
    b.graph.input.push(value_info(
        "images",
        DataType::UINT8,
        &[None, Some(s), Some(s), Some(3)],
    ));
    let n_labels = meta.labels.len() as i64;
    b.graph.output.push(value_info(
        "probabilities",
        DataType::FLOAT,
        &[None, Some(n_labels)],
    ));

    let x = b.preprocess("images");
    let (x, mut size) = b.conv(&vars, &x, "stem_conv", Some("stem_bn"), 2, 1, s)?;
    let mut x = b.silu(&x, "stem");
    for spec in &meta.arch.network().blocks {
        (x, size) = b.block(&vars, &x, spec, size)?;
    }
    let (t, _) = b.conv(&vars, &x, "top_conv", Some("top_bn"), 1, 1, size)?;
    let t = b.silu(&t, "top");
    let pooled = b.node("GlobalAveragePool", &[&t], vec![], "head");
    let flat = b.node("Flatten", &[&pooled], vec![attr_int("axis", 1)], "head");
    let h = b.dense(&vars, &flat, "dense")?;
    let h = b.dense(&vars, &h, "dense_1")?;
    let h = b.node("Relu", &[&h], vec![], "head");
    let logits = b.dense(&vars, &h, "dense_2")?;
    let mut out = NodeProto::new();
    out.op_type = "Sigmoid".into();
    out.name = "head/output".into();
    out.input = vec![logits];
    out.output = vec!["probabilities".into()];
    b.graph.node.push(out);

    let mut model = ModelProto::new();
    model.ir_version = 8;
    model.producer_name = "trainer".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut opset = OperatorSetIdProto::new();
    opset.domain = String::new();
    opset.version = OPSET;
    model.opset_import.push(opset);
    model.graph = Some(b.graph).into();
    let props = [
        ("labels", serde_json::to_string(meta.labels)?),
        ("thresholds", serde_json::to_string(meta.thresholds)?),
        ("preprocessing", preprocessing_text(meta.image_size)),
    ];
    for (k, v) in props {
        let mut e = StringStringEntryProto::new();
        e.key = k.into();
        e.value = v;
        model.metadata_props.push(e);
    }
    Ok(model.write_to_bytes()?)
}

/// The `preprocessing` metadata: the input, then [`preprocess::description`] with the resize's
/// OpenCV call spelled out.
fn preprocessing_text(image_size: usize) -> String {
    let mut m = serde_json::Map::new();
    let input = format!("images: uint8 {}", preprocess::INPUT_LAYOUT);
    m.insert("input".into(), input.into());
    m.extend(preprocess::description(image_size));
    let resize = format!("{} ({})", preprocess::RESIZE, preprocess::RESIZE_CALL);
    m.insert("resize".into(), resize.into());
    serde_json::Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_preprocessing_metadata_names_the_input_and_the_opencv_call() {
        assert_eq!(
            super::preprocessing_text(224),
            r#"{"input":"images: uint8 [N, H, W, 3]","image_size":224,"channel_order":"BGR","resize":"opencv_inter_linear (cv2.resize(img, (size, size)))","scale":"1/255, inside the model"}"#
        );
    }
}
