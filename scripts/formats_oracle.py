"""Writes one small image per format and variant that cv2.imread reads, and what cv2.imread gives.

Usage: python scripts/formats_oracle.py OUT_DIR

For each written file NAME, OUT_DIR/manifest.tsv gets a line "NAME<TAB>ok<TAB>W<TAB>H" and
OUT_DIR/NAME.bgr holds cv2.imread(NAME)'s H*W*3 BGR bytes, or "NAME<TAB>refused" when
cv2.imread returns None. tests/formats.rs decodes the same files with trainer and compares.
Runs with the torch environment's python (numpy, opencv-python-headless, Pillow, tifffile; see
scripts/setup).
"""

import os
import sys

import cv2
import numpy as np
import tifffile
from PIL import Image

W, H = 37, 23
Y, X = np.mgrid[0:H, 0:W]


def pattern8(channels):
    """An 8-bit pattern whose neighbours differ, with smooth parts so lossy codecs keep it."""
    planes = [((X * 7 + Y * 11 + c * 50) % 256) for c in range(channels)]
    planes[0] = (X * 255 // (W - 1)).astype(np.int64) ^ (Y * 3)
    return np.dstack(planes).astype(np.uint8) if channels > 1 else planes[0].astype(np.uint8)


def pattern16(channels):
    """A 16-bit pattern whose low bytes matter (rounding and truncation differ)."""
    planes = [((X * 1777 + Y * 2971 + c * 12345) % 65536) for c in range(channels)]
    img = np.dstack(planes) if channels > 1 else planes[0]
    return img.astype(np.uint16)


def ascii_pnm(path, magic, maxval, rows, comment=True):
    """A hand-written ASCII PGM/PPM with a comment and ragged line breaks."""
    with open(path, "w") as f:
        f.write(f"{magic}\n")
        if comment:
            f.write("# written by formats_oracle\n")
        f.write(f"{W} {H}\n{maxval}\n")
        values = [str(int(v)) for v in rows.reshape(-1)]
        for i in range(0, len(values), 17):
            f.write(" ".join(values[i : i + 17]) + "\n")


def tiff_writers(out):
    rgb8 = pattern8(3)[:, :, ::-1].copy()  # as RGB samples
    rgba8 = np.dstack([rgb8, (X * 255 // (W - 1)).astype(np.uint8)])
    floats = np.dstack([X / W, Y / H, (X + Y) / (W + H)]).astype(np.float32)
    yield "tiff_16bit_rgb.tif", lambda p: tifffile.imwrite(p, pattern16(3), photometric="rgb")
    yield "tiff_16bit_grey.tif", lambda p: tifffile.imwrite(p, pattern16(1), photometric="minisblack")
    yield "tiff_16bit_cv2.tiff", lambda p: cv2.imwrite(p, pattern16(3))
    yield "tiff_float32_rgb.tif", lambda p: tifffile.imwrite(p, floats, photometric="rgb")
    yield "tiff_float32_grey.tif", lambda p: tifffile.imwrite(p, floats[:, :, 0] * 300 - 20)
    yield "tiff_float32_cv2.tif", lambda p: cv2.imwrite(p, floats)
    yield "tiff_rgba_unassociated.tif", lambda p: Image.fromarray(rgba8, "RGBA").save(p)
    yield "tiff_rgba_associated.tif", lambda p: tifffile.imwrite(
        p, rgba8, photometric="rgb", extrasamples=["assocalpha"]
    )
    yield "tiff_jpeg_ycbcr.tif", lambda p: Image.fromarray(rgb8, "RGB").save(
        p, compression="tiff_jpeg", quality=85
    )
    yield "tiff_jpeg_cv2.tif", lambda p: cv2.imwrite(
        p, pattern8(3), [cv2.IMWRITE_TIFF_COMPRESSION, 7]
    )
    yield "tiff_tiled.tif", lambda p: tifffile.imwrite(p, rgb8, photometric="rgb", tile=(16, 16))
    yield "tiff_strips.tif", lambda p: tifffile.imwrite(p, rgb8, photometric="rgb", rowsperstrip=5)
    yield "tiff_palette.tif", lambda p: Image.fromarray(rgb8, "RGB").quantize(40).save(p)
    yield "tiff_bilevel.tif", lambda p: Image.fromarray(rgb8[:, :, 0] > 128).save(p)
    yield "tiff_cmyk.tif", lambda p: Image.fromarray(rgb8, "RGB").convert("CMYK").save(p)
    yield "tiff_grey8_miniswhite.tif", lambda p: tifffile.imwrite(
        p, pattern8(1), photometric="miniswhite"
    )
    for o in range(1, 9):
        yield f"tiff_orientation_{o}.tif", lambda p, o=o: tifffile.imwrite(
            p, rgb8, photometric="rgb", rowsperstrip=7, extratags=[(274, "H", 1, o, False)]
        )
        yield f"tiff_orientation_{o}_16bit.tif", lambda p, o=o: tifffile.imwrite(
            p, pattern16(3), photometric="rgb", extratags=[(274, "H", 1, o, False)]
        )


def jpeg2000_writers(out):
    rgb8 = pattern8(3)[:, :, ::-1].copy()
    grey = pattern8(1)
    lossy = dict(irreversible=True, quality_mode="rates", quality_layers=[12])
    yield "j2k_lossless_rgb.jp2", lambda p: Image.fromarray(rgb8).save(p, irreversible=False)
    yield "j2k_lossy_rgb.jp2", lambda p: Image.fromarray(rgb8).save(p, **lossy)
    yield "j2k_lossless_grey.jp2", lambda p: Image.fromarray(grey).save(p)
    yield "j2k_lossy_grey.jp2", lambda p: Image.fromarray(grey).save(p, **lossy)
    yield "j2k_codestream_rgb.j2k", lambda p: Image.fromarray(rgb8).save(p, **lossy)
    yield "j2k_codestream_grey.j2k", lambda p: Image.fromarray(grey).save(p)
    def sycc(p):
        # A JP2 whose colour specification box says sYCC (enumerated colour space 18): OpenCV
        # converts its components with cvtColor(COLOR_YUV2BGR).
        Image.fromarray(rgb8).save(p, irreversible=False)
        data = bytearray(open(p, "rb").read())
        at = data.index(b"colr") + 4
        assert data[at] == 1 and data[at + 3 : at + 7] == (16).to_bytes(4, "big")
        data[at + 3 : at + 7] = (18).to_bytes(4, "big")
        open(p, "wb").write(bytes(data))

    yield "j2k_sycc.jp2", sycc
    yield "j2k_16bit_grey.jp2", lambda p: Image.fromarray(pattern16(1)).save(p)
    yield "j2k_rgba.jp2", lambda p: Image.fromarray(np.dstack([rgb8, grey]), "RGBA").save(p)


def pnm_writers(out):
    bgr8 = pattern8(3)
    grey = pattern8(1)
    ascii_ = [cv2.IMWRITE_PXM_BINARY, 0]
    yield "pnm_binary.pgm", lambda p: cv2.imwrite(p, grey)
    yield "pnm_binary.ppm", lambda p: cv2.imwrite(p, bgr8)
    yield "pnm_binary.pbm", lambda p: cv2.imwrite(p, (grey > 128).astype(np.uint8) * 255)
    yield "pnm_ascii.pgm", lambda p: cv2.imwrite(p, grey, ascii_)
    yield "pnm_ascii.ppm", lambda p: cv2.imwrite(p, bgr8, ascii_)
    yield "pnm_ascii.pbm", lambda p: cv2.imwrite(p, (grey > 128).astype(np.uint8) * 255, ascii_)
    yield "pnm_16bit_binary.pgm", lambda p: cv2.imwrite(p, pattern16(1))
    yield "pnm_16bit_binary.ppm", lambda p: cv2.imwrite(p, pattern16(3))
    yield "pnm_16bit_ascii.pgm", lambda p: cv2.imwrite(p, pattern16(1), ascii_)
    yield "pnm_16bit_ascii.ppm", lambda p: cv2.imwrite(p, pattern16(3), ascii_)
    yield "pnm_auto.pnm", lambda p: cv2.imwrite(p, bgr8)
    yield "pnm_pillow.ppm", lambda p: Image.fromarray(bgr8[:, :, ::-1].copy()).save(p)
    yield "pnm_pillow.pbm", lambda p: Image.fromarray(grey > 100).save(p)
    # Hand-written: a maximum value of 100 (ASCII is clamped and scaled, rounding down), one of 15
    # (binary is not scaled), one of 1000 (16-bit: high byte, values above it clamped in ASCII),
    # a comment in the header.
    yield "pnm_maxval100_ascii.pgm", lambda p: ascii_pnm(p, "P2", 100, grey % 120)
    yield "pnm_maxval1000_ascii.ppm", lambda p: ascii_pnm(p, "P3", 1000, pattern16(3) % 1200)

    def binary15(p):
        with open(p, "wb") as f:
            f.write(b"P5\n# maxval 15\n%d %d\n15\n" % (W, H))
            f.write((grey % 16).tobytes())

    yield "pnm_maxval15_binary.pgm", binary15


def other_writers(out):
    bgr8 = pattern8(3)
    rgb8 = bgr8[:, :, ::-1].copy()
    yield "png_16bit_rgb.png", lambda p: cv2.imwrite(p, pattern16(3))
    yield "png_16bit_grey.png", lambda p: cv2.imwrite(p, pattern16(1))
    yield "png_16bit_rgba.png", lambda p: cv2.imwrite(p, pattern16(4))
    yield "jpeg_cmyk.jpg", lambda p: Image.fromarray(rgb8).convert("CMYK").save(p, quality=90)
    yield "jpeg_cmyk_smooth.jpg", lambda p: Image.fromarray(
        np.dstack([X * 6, Y * 10, (X + Y) * 4, X * 3]).astype(np.uint8), "CMYK"
    ).save(p, quality=95)
    # Controls: formats that were already read as cv2.imread reads them.
    yield "control.jpg", lambda p: cv2.imwrite(p, bgr8, [cv2.IMWRITE_JPEG_QUALITY, 90])
    yield "control.png", lambda p: cv2.imwrite(p, bgr8)
    yield "control_grey.png", lambda p: cv2.imwrite(p, pattern8(1))
    yield "control.bmp", lambda p: cv2.imwrite(p, bgr8)
    yield "control.tif", lambda p: cv2.imwrite(p, bgr8)
    yield "control.webp", lambda p: cv2.imwrite(p, bgr8, [cv2.IMWRITE_WEBP_QUALITY, 101])


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    lines = []
    for writers in (tiff_writers, jpeg2000_writers, pnm_writers, other_writers):
        for name, write in writers(out):
            path = os.path.join(out, name)
            write(path)
            img = cv2.imread(path)
            if img is None:
                lines.append(f"{name}\trefused\n")
                continue
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
            with open(path + ".bgr", "wb") as f:
                f.write(np.ascontiguousarray(img).tobytes())
            lines.append(f"{name}\tok\t{img.shape[1]}\t{img.shape[0]}\n")
    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
