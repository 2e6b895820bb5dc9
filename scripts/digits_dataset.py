#!/usr/bin/env python3
"""Writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, UCI ML
hand-written digits, shipped inside the package: nothing is downloaded) as a trainer dataset:
one folder per digit and a taxonomy of 14 labels with a hierarchy: the digit, even/odd and
small (0-4)/large (5-9).

usage: digits_dataset.py OUT_DIR   (writes OUT_DIR/data/<digit>/*.png and OUT_DIR/taxonomy.json)
       digits_dataset.py OUT_DIR --rare DIGIT [--keep FRACTION] [--seed S]
With --rare, an imbalanced variant: a fixed 20% of each digit's scans (the same whatever --seed)
go untouched to OUT_DIR/val/<digit>/ for `trainer eval --data OUT_DIR/val`, and of the rest, in
OUT_DIR/data/, DIGIT keeps only FRACTION of its scans (default 0.05, at least one), chosen with
--seed (default 0).
"""
import argparse
import json
import pathlib
import random
import zlib
import struct

from sklearn.datasets import load_digits

# The held-out fifth of each digit depends on this seed only, so every run is scored on the same scans.
VAL_SEED = 0
VAL_FRACTION = 0.2


def png(pixels, size):
    """An 8-bit greyscale PNG of a size x size list of rows."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def fraction(text):
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def placement(targets, rare, keep, seed):
    """Folder ("data" or "val") of each scan, None for one cut out of the training split."""
    where = ["data"] * len(targets)
    if rare is None:
        return where
    for d in range(10):
        scans = [i for i, t in enumerate(targets) if t == d]
        random.Random(VAL_SEED * 10 + d).shuffle(scans)
        n_val = round(len(scans) * VAL_FRACTION)
        for i in scans[:n_val]:
            where[i] = "val"
        if d == rare:
            train = sorted(scans[n_val:])
            random.Random(seed).shuffle(train)
            for i in train[max(1, round(len(train) * keep)):]:
                where[i] = None
    return where


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--rare", type=int, choices=range(10), metavar="DIGIT")
    parser.add_argument("--keep", type=fraction, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out
    digits = load_digits()
    labels = [str(d) for d in range(10)] + ["even", "odd", "small", "large"]
    folders = {}
    splits = ["data"] + (["val"] if args.rare is not None else [])
    for d in range(10):
        folders[f"digit{d}"] = [str(d), "even" if d % 2 == 0 else "odd", "small" if d < 5 else "large"]
        for split in splits:
            (out / split / f"digit{d}").mkdir(parents=True, exist_ok=True)
    where = placement(list(digits.target), args.rare, args.keep, args.seed)
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        if where[i] is None:
            continue
        # 16 grey levels, ink high -> dark ink on white paper, as in a scanned book.
        rows = [[255 - int(v) * 255 // 16 for v in row] for row in image]
        (out / where[i] / f"digit{target}" / f"{i:04d}.png").write_bytes(png(rows, 8))
    (out / "taxonomy.json").write_text(json.dumps({"labels": labels, "folders": folders}, indent=1))
    if args.rare is None:
        print(f"{len(digits.images)} images, {len(labels)} labels in {out}")
        return
    count = lambda split, d=None: sum(1 for w, t in zip(where, digits.target) if w == split and d in (None, t))
    print(f"{count('data')} training images ({count('data', args.rare)} of digit {args.rare}), "
          f"{count('val')} validation images ({count('val', args.rare)} of digit {args.rare}), "
          f"{len(labels)} labels in {out}")


if __name__ == "__main__":
    main()
