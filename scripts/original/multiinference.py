#!/usr/bin/env python3
"""The original batch tagger (multiinference.py), as ../shared/docs/original-behaviour.md describes
it, for side-by-side benchmarks: the Keras EfficientNet-B0 model of the original scripts, the
weights file loaded with `model.load_weights`, and for each subfolder INPUT/<PID>/ every image read
with cv2.imread, resized with cv2.resize to 224x224, divided by 255, predicted in batches of 64,
and OUTPUT/<PID>.json written with the labels above 0.4 (3 decimals).

Needs tensorflow-cpu==2.15.1 efficientnet==1.1.1 opencv-python-headless (scripts/bench-infer-vs-original
installs them in a scratch virtual environment).
Usage: multiinference.py WEIGHTS.hdf5 INPUT OUTPUT
"""
import json
import os
import sys

import cv2
import numpy as np
import efficientnet.tfkeras as efn
from tensorflow.keras import layers, models

CLASSES = ["graphic", "picture", "graphic_graph", "graphic_map", "graphic_illustcolor", "picture_indoor",
           "picture_object", "picture_person", "picture_outdoor", "picture_landmark", "stamp"]


def original_model(variant="EfficientNetB0", size=224):
    """The original model; `variant` and `size` build the same tagger on another EfficientNet
    (`EfficientNetB3`, 300) for scripts/check_keras_roundtrip.py; this script uses the defaults."""
    base = getattr(efn, variant)(include_top=False, weights=None, input_shape=(size, size, 3))
    x = layers.GlobalAveragePooling2D()(base.output)
    x = layers.Dense(512)(x)
    x = layers.Dense(512, activation="relu")(x)
    out = layers.Dense(len(CLASSES), activation="sigmoid")(x)
    return models.Model(base.input, out)


def main():
    weights, input_dir, output_dir = sys.argv[1:4]
    model = original_model()
    model.load_weights(weights)
    os.makedirs(output_dir, exist_ok=True)
    for pid in sorted(os.listdir(input_dir)):
        folder = os.path.join(input_dir, pid)
        if not os.path.isdir(folder):
            continue
        names, images = [], []
        for f in sorted(os.listdir(folder)):
            img = cv2.imread(os.path.join(folder, f))
            if img is None:
                print("skipped", f)
                continue
            names.append(os.path.splitext(f)[0])
            images.append(cv2.resize(img, (224, 224)))
        result = {}
        if images:
            probs = model.predict(np.stack(images) / 255.0, batch_size=64, verbose=0)
            for name, p in zip(names, probs):
                result[name] = [{"tag": c, "confidence": round(float(v), 3)}
                                for c, v in zip(CLASSES, p) if v > 0.4]
        with open(os.path.join(output_dir, pid + ".json"), "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main()
