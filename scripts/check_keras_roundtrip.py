#!/usr/bin/env python3
"""Checks that a Keras weights file written by `trainer fit` (weights_pdm_multi/*.hdf5) loads
into the original Keras model with `model.load_weights` and tags images as trainer does.

Needs tensorflow 2.15 and efficientnet 1.1.1 (not part of the test suite):
    pip install tensorflow-cpu==2.15.1 efficientnet==1.1.1 opencv-python-headless
Usage:
    check_keras_roundtrip.py [--arch efficientnet-bN] [--image-size S] WEIGHTS.hdf5 IMAGE_DIR TRAINER_JSON
where TRAINER_JSON is `trainer infer --threshold 0` output for IMAGE_DIR with the same weights
(or the checkpoint of the same epoch). Builds the original architecture (the original script's
model, `EfficientNetBN` in place of `EfficientNetB0` for `--arch efficientnet-bN`, default b0),
predicts every image with the original preprocessing (cv2.imread, cv2.resize to the size, /255;
the size defaults to the variant's resolution, give the run's `--image-size` otherwise) and prints
the largest difference to trainer's confidences.
"""
import argparse
import json
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "original"))
from multiinference import CLASSES, original_model  # noqa: E402

# The `efficientnet` package's default_resolution of each variant (trainer's --image-size default).
RESOLUTIONS = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="efficientnet-b0", choices=[f"efficientnet-{v}" for v in RESOLUTIONS],
                        help="the run's --arch (default efficientnet-b0, the original model)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the run's --image-size (default the variant's resolution)")
    parser.add_argument("weights", help="a weights_pdm_multi/*.hdf5 file written by trainer fit")
    parser.add_argument("image_dir", help="a folder of images")
    parser.add_argument("trainer_json", help="trainer infer --threshold 0 output for IMAGE_DIR")
    args = parser.parse_args()
    variant = args.arch.removeprefix("efficientnet-")
    if args.image_size is None:
        args.image_size = RESOLUTIONS[variant]
    if not 32 <= args.image_size <= 2048:
        parser.error(f"--image-size {args.image_size}: use 32 to 2048, as trainer")
    args.keras_name = "EfficientNet" + variant.upper()
    return args


def main():
    args = arguments()
    size = args.image_size
    model = original_model(args.keras_name, size)
    model.load_weights(args.weights)
    ours = json.load(open(args.trainer_json))
    names = sorted(f for f in os.listdir(args.image_dir) if not f.startswith("."))
    batch = np.stack([cv2.resize(cv2.imread(os.path.join(args.image_dir, f)), (size, size)) for f in names]) / 255.0
    probs = model.predict(batch, batch_size=16, verbose=0)
    worst = 0.0
    for f, p in zip(names, probs):
        theirs = {t["tag"]: t["confidence"] for t in ours[os.path.splitext(f)[0]]}
        for label, value in zip(CLASSES, p):
            worst = max(worst, abs(round(float(value), 3) - theirs[label]))
    # How much the probabilities move between images: near 0 (a model fresh from random weights
    # whose batch-norm statistics are still the initial ones) only the head is really compared.
    spread = float((probs.max(axis=0) - probs.min(axis=0)).max()) if len(names) > 1 else 0.0
    print(f"{args.arch} at {size} px, {len(names)} images, 11 labels: largest |keras - trainer| = {worst:.4f}"
          f" (probabilities spread {spread:.3f} between images)")
    sys.exit(0 if worst <= 0.0015 else 1)


if __name__ == "__main__":
    main()
