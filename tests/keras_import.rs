//! Keras files of the wrong shape or layout are refused with a message naming the first bad
//! tensor, and leave the model untouched.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Tensor};
use trainer::model::arch::Arch;
use trainer::model::efficientnet::{Tagger, TaggerConfig};
use trainer::model::keras::{self, KerasError};

fn model(num_classes: i64) -> (nn::VarStore, Tagger) {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Tagger::new(
        &vs.root(),
        TaggerConfig {
            num_classes,
            ..Default::default()
        },
    );
    (vs, net)
}

fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn unchanged(vs: &nn::VarStore, before: &[(String, Tensor)]) -> bool {
    let vars = vs.variables();
    before.iter().all(|(k, t)| vars[k].equal(t))
}

/// A copy of an oracle file edited with h5 operations (`edit` gets the layer-group root).
fn edited(name: &str, edit: impl FnOnce(&hdf5::Group)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::copy(common::oracle().join(name), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    {
        let file = hdf5::File::open_rw(&path).unwrap();
        let root = file
            .group("model_weights")
            .unwrap_or_else(|_| file.as_group().unwrap());
        edit(&root);
    }
    (dir, path)
}

#[test]
fn wrong_number_of_classes_names_the_head_kernel() {
    let (vs, _net) = model(5);
    let before = snapshot(&vs);
    let err = keras::load(&common::oracle().join("ndl_b0_model.hdf5"), &vs, Arch::B0).unwrap_err();
    match &err {
        KerasError::Shape {
            tensor,
            found,
            expected,
            ..
        } => {
            assert_eq!(tensor, "dense_2/dense_2/kernel:0");
            assert_eq!(found, &[512, 11]);
            assert_eq!(expected, &[512, 5]);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("ndl_b0_model.hdf5"));
    assert!(
        unchanged(&vs, &before),
        "a refused file must not change the model"
    );
}

#[test]
fn backbone_only_file_leaves_the_head_and_says_so() {
    let (vs, _net) = model(11);
    let head_before = vs.variables()["dense_2.weight"].copy();
    let report = keras::load(&common::oracle().join("b0_notop_weights.h5"), &vs, Arch::B0).unwrap();
    assert!(!report.head_loaded);
    assert_eq!(report.applied, 309);
    assert!(report.to_string().contains("backbone only"));
    assert!(vs.variables()["dense_2.weight"].equal(&head_before));
}

#[test]
fn a_missing_tensor_is_named() {
    let (_dir, path) = edited("ndl_b0_weights.h5", |root| {
        root.unlink("block3b_dwconv/block3b_dwconv/depthwise_kernel:0")
            .unwrap();
        root.group("block3b_dwconv")
            .unwrap()
            .delete_attr("weight_names")
            .unwrap();
        root.group("block3b_dwconv")
            .unwrap()
            .new_attr::<f64>()
            .shape(0)
            .create("weight_names")
            .unwrap();
    });
    let (vs, _net) = model(11);
    let before = snapshot(&vs);
    let err = keras::load(&path, &vs, Arch::B0).unwrap_err();
    assert!(matches!(err, KerasError::Missing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("block3b_dwconv/depthwise_kernel:0"),
        "{err}"
    );
    assert!(unchanged(&vs, &before));
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let (_dir, path) = edited("ndl_b0_weights.h5", |root| {
        let g = root.group("block2a_se_reduce/block2a_se_reduce").unwrap();
        g.unlink("bias:0").unwrap();
        g.new_dataset::<f32>().shape(7).create("bias:0").unwrap();
    });
    let (vs, _net) = model(11);
    let err = keras::load(&path, &vs, Arch::B0).unwrap_err().to_string();
    assert!(
        err.contains("block2a_se_reduce/block2a_se_reduce/bias:0") && err.contains("[7]"),
        "{err}"
    );
}

#[test]
fn a_file_without_layer_names_is_not_keras() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.h5");
    hdf5::File::create(&path)
        .unwrap()
        .new_dataset::<f32>()
        .shape(3)
        .create("x")
        .unwrap();
    let (vs, _net) = model(11);
    let err = keras::load(&path, &vs, Arch::B0).unwrap_err().to_string();
    assert!(
        err.contains("other.h5") && err.contains("not a Keras weights file"),
        "{err}"
    );
    assert!(keras::load(Path::new("/nonexistent.h5"), &vs, Arch::B0).is_err());
}

#[test]
fn exported_weights_read_back_identically_with_the_oracle_layout() {
    let (vs, _net) = model(11);
    keras::load(&common::oracle().join("ndl_b0_weights.h5"), &vs, Arch::B0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("val_loss0.123.hdf5");
    keras::save_weights(&vs, Arch::B0, &out).unwrap();
    // Same layer_names and weight_names as the file real Keras wrote.
    let ours = hdf5::File::open(&out).unwrap();
    let theirs = hdf5::File::open(common::oracle().join("ndl_b0_weights.h5")).unwrap();
    let names = |f: &hdf5::File| -> Vec<String> {
        f.attr("layer_names")
            .unwrap()
            .read_raw::<hdf5::types::VarLenAscii>()
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    assert_eq!(names(&ours), names(&theirs));
    for layer in names(&theirs) {
        let wn = |f: &hdf5::File| -> Vec<String> {
            let a = f.group(&layer).unwrap().attr("weight_names").unwrap();
            a.read_raw::<hdf5::types::VarLenAscii>()
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default()
        };
        assert_eq!(wn(&ours), wn(&theirs), "weight_names of {layer}");
    }
    // Every tensor identical.
    let a = keras::read(&out).unwrap();
    let b = keras::read(&common::oracle().join("ndl_b0_weights.h5")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape, "{}", x.name);
        assert_eq!(x.data, y.data, "{}", x.name);
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}
