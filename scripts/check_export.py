#!/usr/bin/env python3
"""Checks exported models against the Keras oracle: `onnx.checker`, then onnxruntime on the ONNX
file and torch.jit.load on the TorchScript file, on the 96 oracle inputs (uint8 BGR 224x224, as
cv2.imread + cv2.resize give them) in batches of 1, 16 and 96, against Keras's probabilities.
Prints one JSON object; exits 1 when a difference is above 1e-4.

Usage: check_export.py MODEL.onnx MODEL.pt ORACLE_DIR [EXPECTED.npy [INPUTS.npy]]
(EXPECTED.npy: other probabilities to compare with, for a model other than the oracle's;
INPUTS.npy: other uint8 BGR inputs [N, S, S, 3], for a model of another input size)
Needs numpy, onnx, onnxruntime and torch (scripts/setup installs them in the torch environment).
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch


def batches(run, x):
    worst = {}
    for size in (1, 16, 96):
        out = np.concatenate([run(x[i:i + size]) for i in range(0, len(x), size)])
        worst[size] = out
    return worst


def main():
    onnx_path, pt_path, oracle = sys.argv[1:4]
    x = np.load(sys.argv[5] if len(sys.argv) > 5 else os.path.join(oracle, "inputs_224_bgr_u8.npy"))
    expected = np.load(sys.argv[4] if len(sys.argv) > 4 else os.path.join(oracle, "probs.npy"))
    report = {}

    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    report["onnx_opset"] = model.opset_import[0].version
    report["onnx_labels"] = json.loads(meta["labels"])
    report["onnx_thresholds"] = json.loads(meta["thresholds"])
    report["onnx_preprocessing"] = json.loads(meta["preprocessing"])
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    report["onnx_io"] = [session.get_inputs()[0].name, session.get_outputs()[0].name]
    outs = batches(lambda b: session.run(["probabilities"], {"images": b})[0], x)
    report["onnx_max_diff"] = {k: float(np.abs(v - expected).max()) for k, v in outs.items()}

    extra = {"labels.json": "", "thresholds.json": "", "preprocessing.json": ""}
    module = torch.jit.load(pt_path, _extra_files=extra)
    report["torchscript_labels"] = json.loads(extra["labels.json"])
    report["torchscript_thresholds"] = json.loads(extra["thresholds.json"])
    with torch.no_grad():
        outs = batches(lambda b: module(torch.from_numpy(b)).numpy(), x)
    report["torchscript_max_diff"] = {k: float(np.abs(v - expected).max()) for k, v in outs.items()}
    print(json.dumps(report))
    worst = max(list(report["onnx_max_diff"].values()) + list(report["torchscript_max_diff"].values()))
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
