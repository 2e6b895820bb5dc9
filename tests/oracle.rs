//! The Keras oracle is the judge: our preprocessing and model must reproduce what real Keras
//! computed from the original model.

mod common;

use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
use trainer::data::decode::load_resized;
use trainer::model::arch::Arch;
use trainer::model::efficientnet::{Tagger, TaggerConfig};
use trainer::model::keras::{self, KerasLayout};

fn oracle_inputs() -> Tensor {
    Tensor::read_npy(common::oracle().join("inputs_224_bgr_u8.npy")).expect("inputs npy")
}

#[test]
fn resize_equals_opencv_byte_for_byte() {
    resize_equals(&common::oracle(), "inputs_224_bgr_u8.npy", 224);
}

#[test]
fn resize_to_b1s_240_equals_opencv_byte_for_byte() {
    resize_equals(&common::oracle_b1(), "inputs_240_bgr_u8.npy", 240);
}

/// Our resize of the oracle's images to `size` equals what `cv2.resize` gave Keras.
fn resize_equals(oracle: &std::path::Path, inputs: &str, size: usize) {
    let expected = Tensor::read_npy(oracle.join(inputs)).expect("inputs npy");
    let s = size as i64;
    assert_eq!(expected.size(), [96, s, s, 3]);
    let images = common::oracle_images_of(oracle);
    assert_eq!(images.len(), 96);
    let mut bad = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let ours = load_resized(path, size).expect("decodes");
        let theirs = Vec::<u8>::try_from(expected.get(i as i64).flatten(0, -1)).unwrap();
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        if differing > 0 {
            let max = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max();
            bad.push(format!(
                "{}: {differing} bytes differ (max {max:?})",
                path.display()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 96 images differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn probs_from(file: &str) -> (Tensor, keras::ImportReport) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Tagger::new(&vs.root(), TaggerConfig::default());
    let report = keras::load(&common::oracle().join(file), &vs, Arch::B0).expect("loads");
    let x = oracle_inputs().permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
    let probs = tch::no_grad(|| {
        Tensor::cat(
            &x.split(16, 0)
                .iter()
                .map(|b| model.forward_t(b, false).sigmoid())
                .collect::<Vec<_>>(),
            0,
        )
    });
    (probs, report)
}

fn max_abs_diff_to_oracle(probs: &Tensor) -> f64 {
    let expected = Tensor::read_npy(common::oracle().join("probs.npy")).unwrap();
    assert_eq!(expected.size(), [96, 11]);
    let diff = (probs - expected).abs().max().double_value(&[]);
    eprintln!("max abs difference to probs.npy: {diff:.3e}");
    diff
}

#[test]
fn full_model_file_gives_oracle_probabilities() {
    let (probs, report) = probs_from("ndl_b0_model.hdf5");
    assert_eq!(report.layout, KerasLayout::FullModel);
    assert!(report.head_loaded);
    assert_eq!(report.applied, 315);
    let diff = max_abs_diff_to_oracle(&probs);
    assert!(diff < 1e-4, "max abs difference to probs.npy: {diff}");
}

#[test]
fn weights_only_file_gives_oracle_probabilities() {
    let (probs, report) = probs_from("ndl_b0_weights.h5");
    assert_eq!(report.layout, KerasLayout::WeightsOnly);
    let diff = max_abs_diff_to_oracle(&probs);
    assert!(diff < 1e-4, "max abs difference to probs.npy: {diff}");
}

#[test]
fn the_inference_model_gives_oracle_probabilities() {
    // LoadedModel is what `infer` and `eval` use (channels-last, uint8 input).
    let model =
        trainer::model::LoadedModel::load(&common::oracle().join("ndl_b0_model.hdf5"), Device::Cpu)
            .unwrap();
    let inputs = oracle_inputs();
    let bytes = Vec::<u8>::try_from(inputs.flatten(0, -1)).unwrap();
    let probs = model.predict(&bytes, 96).unwrap();
    let diff = max_abs_diff_to_oracle(&Tensor::from_slice(&probs).view([96, 11]));
    assert!(diff < 1e-4, "max abs difference to probs.npy: {diff}");
}

#[test]
fn a_keras_b1_file_is_read_as_b1_at_240_and_gives_keras_probabilities_on_both_engines() {
    use trainer::model::{Engine, LoadedModel};
    let dir = common::oracle_b1();
    let inputs = Tensor::read_npy(dir.join("inputs_240_bgr_u8.npy")).unwrap();
    let expected = Tensor::read_npy(dir.join("probs.npy")).unwrap();
    let bytes = Vec::<u8>::try_from(inputs.flatten(0, -1)).unwrap();
    let file = "ndl_b1_weights.h5";
    for engine in [Engine::Onnxruntime, Engine::Torch] {
        let mut model = LoadedModel::load(&dir.join(file), Device::Cpu).unwrap();
        assert_eq!(model.net.config.arch, Arch::B1);
        assert_eq!(model.image_size, 240);
        assert!(
            model
                .description
                .contains("Keras weights of efficientnet-b1: "),
            "{}",
            model.description
        );
        assert_eq!(model.choose_engine(engine).unwrap(), None);
        let probs = model.predict(&bytes, 96).unwrap();
        let diff = (Tensor::from_slice(&probs).view([96, 11]) - &expected)
            .abs()
            .max()
            .double_value(&[]);
        eprintln!("{file} on {engine:?}: max abs difference to Keras {diff:.3e}");
        assert!(diff < 1e-4, "{file} on {engine:?}: {diff}");
    }
}

#[test]
fn a_b1_backbone_file_is_recognised_but_cannot_tag() {
    let notop = common::oracle_b1().join("b1_notop_weights.h5");
    assert_eq!(keras::variant(&notop).unwrap(), Arch::B1);
    let err = trainer::model::LoadedModel::load(&notop, Device::Cpu)
        .err()
        .expect("a backbone cannot tag")
        .to_string();
    assert!(err.contains("holds only the backbone"), "{err}");
    for (file, arch) in [
        ("ndl_b0_model.hdf5", Arch::B0),
        ("ndl_b0_weights.h5", Arch::B0),
        ("b0_notop_weights.h5", Arch::B0),
    ] {
        assert_eq!(keras::variant(&common::oracle().join(file)).unwrap(), arch);
    }
}

#[test]
fn both_engines_give_oracle_probabilities_in_image_order() {
    // ONNX Runtime (what `infer` and `eval` use on the CPU) and libtorch, on batches of 1, 7 and
    // 88 images: 7 and 88 are not multiples of the engine's chunk of images, so a chunk put back
    // in the wrong place or a short last chunk would show.
    use trainer::model::{Engine, LoadedModel};
    let weights = common::oracle().join("ndl_b0_model.hdf5");
    let mut ort = LoadedModel::load(&weights, Device::Cpu).unwrap();
    assert_eq!(ort.choose_engine(Engine::Onnxruntime).unwrap(), None);
    assert_eq!(ort.engine_name(), "onnxruntime");
    let mut torch = LoadedModel::load(&weights, Device::Cpu).unwrap();
    assert_eq!(torch.choose_engine(Engine::Torch).unwrap(), None);
    assert_eq!(torch.engine_name(), "libtorch");
    let bytes = Vec::<u8>::try_from(oracle_inputs().flatten(0, -1)).unwrap();
    let per_image = 224 * 224 * 3;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut start = 0;
    for n in [1, 7, 88] {
        let batch = &bytes[start * per_image..(start + n) * per_image];
        a.extend(ort.predict(batch, n).unwrap());
        b.extend(torch.predict(batch, n).unwrap());
        start += n;
    }
    let (a, b) = (
        Tensor::from_slice(&a).view([96, 11]),
        Tensor::from_slice(&b).view([96, 11]),
    );
    assert!(max_abs_diff_to_oracle(&a) < 1e-4);
    let between = (&a - &b).abs().max().double_value(&[]);
    assert!(
        between < 1e-4,
        "onnxruntime and libtorch differ by {between}"
    );
    assert!(
        ort.predict(&bytes[..per_image], 2).is_err(),
        "a byte count that is not two images is refused"
    );
}
