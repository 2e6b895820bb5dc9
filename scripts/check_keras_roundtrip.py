#!/usr/bin/env python3
"""Checks that a Keras weights file written by `trainer fit` (weights_pdm_multi/*.hdf5) loads
into the original Keras model with `model.load_weights` and tags images as trainer does.

Needs tensorflow 2.15 and efficientnet 1.1.1 (not part of the test suite):
    pip install tensorflow-cpu==2.15.1 efficientnet==1.1.1 opencv-python-headless
Usage:
    check_keras_roundtrip.py WEIGHTS.hdf5 IMAGE_DIR TRAINER_JSON
where TRAINER_JSON is `trainer infer --threshold 0` output for IMAGE_DIR with the same weights.
Builds the original architecture, predicts every image with the original preprocessing
(cv2.imread, cv2.resize to 224, /255) and prints the largest difference to trainer's confidences.
"""
import json
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "original"))
from multiinference import CLASSES, original_model  # noqa: E402


def main():
    weights, image_dir, trainer_json = sys.argv[1:4]
    model = original_model()
    model.load_weights(weights)
    ours = json.load(open(trainer_json))
    names = sorted(f for f in os.listdir(image_dir) if not f.startswith("."))
    batch = np.stack([cv2.resize(cv2.imread(os.path.join(image_dir, f)), (224, 224)) for f in names]) / 255.0
    probs = model.predict(batch, batch_size=16, verbose=0)
    worst = 0.0
    for f, p in zip(names, probs):
        theirs = {t["tag"]: t["confidence"] for t in ours[os.path.splitext(f)[0]]}
        for label, value in zip(CLASSES, p):
            worst = max(worst, abs(round(float(value), 3) - theirs[label]))
    print(f"{len(names)} images, 11 labels: largest |keras - trainer| = {worst:.4f}")
    sys.exit(0 if worst <= 0.0015 else 1)


if __name__ == "__main__":
    main()
