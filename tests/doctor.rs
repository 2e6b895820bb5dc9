//! `trainer doctor`: the block a user pastes into a bug report.

mod common;

#[test]
fn doctor_tells_the_torch_build_the_gpu_verdict_and_the_cpu() {
    let out = common::trainer().arg("doctor").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("libtorch: {}", trainer::gpu::TORCH_BUILD)),
        "{text}"
    );
    assert!(text.contains("verdict: "), "{text}");
    assert!(
        text.contains("CPU: ") && text.contains("threads: libtorch"),
        "{text}"
    );
    let graphs = match trainer::train::graph::BUILT {
        true => "in this build",
        false => "not in this build",
    };
    assert!(
        text.contains(&format!(
            "CUDA graphs of the training step (fit --cuda-graphs on): {graphs}"
        )),
        "{text}"
    );
    // scripts/setup installs the onnxruntime wheel the build finds.
    assert!(
        text.contains("CPU engine of infer and eval (fp32): ONNX Runtime 1."),
        "{text}"
    );
    assert!(
        text.contains("libtorch build configuration:") && text.contains("PyTorch built with"),
        "{text}"
    );
    if !std::path::Path::new("/dev/nvidia0").exists() && !tch::Cuda::is_available() {
        assert!(
            text.contains("verdict: no GPU: everything runs on the CPU"),
            "{text}"
        );
    }
}
