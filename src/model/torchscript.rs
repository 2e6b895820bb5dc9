//! The tagger as TorchScript, traced through libtorch: input `images` (uint8, as `cv2.imread` +
//! `cv2.resize` give them), the preprocessing of `data::preprocess` (scaling and layout change)
//! inside, output `probabilities` (float32, [N, labels]). Labels, thresholds and the preprocessing travel as the extra files
//! `labels.json`, `thresholds.json` and `preprocessing.json`.

use std::ffi::{c_char, c_int, CString};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::nn::ModuleT;
use tch::{CModule, Device, Kind, Tensor};

use super::onnx::Metadata;
use super::LoadedModel;
use crate::data::preprocess;

// src/shim/torchscript.cpp
extern "C" {
    fn trainer_jit_save_with_extra_files(
        in_path: *const c_char,
        out_path: *const c_char,
        names: *const *const c_char,
        contents: *const *const c_char,
        n: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
}

/// The extra files: name and JSON text.
pub fn extra_files(meta: &Metadata) -> Result<Vec<(String, String)>> {
    Ok(vec![
        ("labels.json".into(), serde_json::to_string(meta.labels)?),
        (
            "thresholds.json".into(),
            serde_json::to_string(meta.thresholds)?,
        ),
        (
            "preprocessing.json".into(),
            serde_json::Value::Object(preprocess::description(meta.image_size)).to_string(),
        ),
    ])
}

/// Traces the model (on the CPU, fp32) and writes it to `out` (a path the caller makes atomic).
pub fn export(model: &LoadedModel, meta: &Metadata, out: &Path) -> Result<()> {
    if model.vs.device() != Device::Cpu {
        bail!("TorchScript export traces the model on the CPU");
    }
    let s = meta.image_size as i64;
    let example = Tensor::zeros([2, s, s, 3], (Kind::Uint8, Device::Cpu));
    let traced = tch::no_grad(|| {
        CModule::create_by_tracing("ndl_tagger", "forward", &[example], &mut |inputs| {
            let x = preprocess::to_input(&inputs[0]);
            vec![model.net.forward_t(&x, false).sigmoid()]
        })
    })
    .context("cannot trace the model")?;
    let plain = out.with_extension("plain.tmp");
    traced
        .save(&plain)
        .with_context(|| format!("cannot write {}", plain.display()))?;
    let files = extra_files(meta)?;
    let names: Vec<CString> = files
        .iter()
        .map(|(n, _)| CString::new(n.as_str()))
        .collect::<Result<_, _>>()?;
    let contents: Vec<CString> = files
        .iter()
        .map(|(_, c)| CString::new(c.as_str()))
        .collect::<Result<_, _>>()?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let content_ptrs: Vec<*const c_char> = contents.iter().map(|c| c.as_ptr()).collect();
    let (src, dst) = (
        CString::new(plain.to_string_lossy().as_bytes())?,
        CString::new(out.to_string_lossy().as_bytes())?,
    );
    let mut err = vec![0 as c_char; 1024];
    // SAFETY: every pointer is a live NUL-terminated string for the duration of the call; the
    // shim writes at most `err.len()` bytes into `err`.
    let rc = unsafe {
        trainer_jit_save_with_extra_files(
            src.as_ptr(),
            dst.as_ptr(),
            name_ptrs.as_ptr(),
            content_ptrs.as_ptr(),
            files.len() as c_int,
            err.as_mut_ptr(),
            err.len() as c_int,
        )
    };
    let _ = std::fs::remove_file(&plain);
    if rc != 0 {
        // SAFETY: the shim NUL-terminates the message.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        bail!("cannot write {}: {msg}", out.display());
    }
    Ok(())
}
