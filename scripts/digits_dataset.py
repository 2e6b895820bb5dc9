#!/usr/bin/env python3
"""Writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, UCI ML
hand-written digits, shipped inside the package: nothing is downloaded) as a trainer dataset:
one folder per digit and a taxonomy of 14 labels with a hierarchy: the digit, even/odd and
small (0-4)/large (5-9).

usage: digits_dataset.py OUT_DIR   (writes OUT_DIR/data/<digit>/*.png and OUT_DIR/taxonomy.json)
"""
import json
import pathlib
import sys
import zlib
import struct

from sklearn.datasets import load_digits


def png(pixels, size):
    """An 8-bit greyscale PNG of a size x size list of rows."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main():
    out = pathlib.Path(sys.argv[1])
    digits = load_digits()
    labels = [str(d) for d in range(10)] + ["even", "odd", "small", "large"]
    folders = {}
    for d in range(10):
        folders[f"digit{d}"] = [str(d), "even" if d % 2 == 0 else "odd", "small" if d < 5 else "large"]
        (out / "data" / f"digit{d}").mkdir(parents=True, exist_ok=True)
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        # 16 grey levels, ink high -> dark ink on white paper, as in a scanned book.
        rows = [[255 - int(v) * 255 // 16 for v in row] for row in image]
        (out / "data" / f"digit{target}" / f"{i:04d}.png").write_bytes(png(rows, 8))
    (out / "taxonomy.json").write_text(json.dumps({"labels": labels, "folders": folders}, indent=1))
    print(f"{len(digits.images)} images, {len(labels)} labels in {out}")


if __name__ == "__main__":
    main()
