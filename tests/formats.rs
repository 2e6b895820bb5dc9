//! Every format and variant `cv2.imread` reads gives the same pixels through trainer: real
//! OpenCV (opencv-python-headless in the torch environment, pinned by scripts/setup) writes and
//! reads each file (scripts/formats_oracle.py), trainer decodes the same file, byte for byte.
//! Where `cv2.imread` refuses a file (an IEEE float TIFF, a grey JPEG 2000 codestream without a
//! colour space), trainer refuses it too, naming the file.

mod common;

use std::path::{Path, PathBuf};

use trainer::data::decode::{has_image_extension, read_bgr};

/// Runs the oracle script into `dir` and returns its manifest lines, split at tabs.
fn oracle(dir: &Path) -> Vec<Vec<String>> {
    let out = std::process::Command::new(common::torch_python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/formats_oracle.py"))
        .arg(dir)
        .env("OPENCV_LOG_LEVEL", "ERROR")
        .output()
        .unwrap();
    common::succeeded(&out);
    std::fs::read_to_string(dir.join("manifest.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// Compares one file; `None` when trainer gives what cv2.imread gave.
fn mismatch(dir: &Path, row: &[String]) -> Option<String> {
    let name = &row[0];
    let path = dir.join(name);
    let got = read_bgr(&path);
    if row[1] == "refused" {
        return match got {
            Err(e) if e.to_string().contains(name.as_str()) => None,
            Err(e) => Some(format!("{name}: error does not name the file: {e}")),
            Ok(img) => Some(format!(
                "{name}: cv2.imread refuses it, trainer read {}x{}",
                img.width, img.height
            )),
        };
    }
    let (w, h): (usize, usize) = (row[2].parse().unwrap(), row[3].parse().unwrap());
    let want = std::fs::read(dir.join(format!("{name}.bgr"))).unwrap();
    let img = match got {
        Ok(img) => img,
        Err(e) => return Some(format!("{name}: cv2.imread reads it, trainer: {e}")),
    };
    if (img.width, img.height) != (w, h) {
        return Some(format!(
            "{name}: {}x{}, cv2.imread {w}x{h}",
            img.width, img.height
        ));
    }
    let diffs: Vec<usize> = (0..want.len())
        .filter(|&i| img.data[i] != want[i])
        .collect();
    if diffs.is_empty() {
        return None;
    }
    let worst = diffs
        .iter()
        .map(|&i| img.data[i].abs_diff(want[i]))
        .max()
        .unwrap_or(0);
    let i = diffs[0];
    Some(format!(
        "{name}: {} of {} bytes differ (at most {worst}); first at pixel ({}, {}) channel {}: \
         trainer {} cv2 {}",
        diffs.len(),
        want.len(),
        i / 3 % w,
        i / 3 / w,
        i % 3,
        img.data[i],
        want[i]
    ))
}

#[test]
fn every_format_decodes_as_cv2_imread() {
    let dir = tempfile::tempdir().unwrap();
    let rows = oracle(dir.path());
    assert!(rows.len() >= 60, "{} files", rows.len());
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|r| mismatch(dir.path(), r))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every variant the task names is there, read or refused as OpenCV does.
    for name in [
        "j2k_lossless_rgb.jp2",
        "j2k_lossy_rgb.jp2",
        "j2k_lossless_grey.jp2",
        "j2k_lossy_grey.jp2",
        "j2k_codestream_rgb.j2k",
        "j2k_sycc.jp2",
        "j2k_16bit_grey.jp2",
        "pnm_binary.pbm",
        "pnm_ascii.pbm",
        "pnm_binary.pgm",
        "pnm_ascii.pgm",
        "pnm_binary.ppm",
        "pnm_ascii.ppm",
        "pnm_16bit_binary.pgm",
        "pnm_16bit_ascii.ppm",
        "tiff_float32_rgb.tif",
        "tiff_16bit_rgb.tif",
        "tiff_16bit_grey.tif",
        "png_16bit_rgb.png",
        "png_16bit_grey.png",
        "tiff_rgba_unassociated.tif",
        "tiff_jpeg_ycbcr.tif",
        "tiff_jpeg_cv2.tif",
        "tiff_float32_cv2.tif",
        "tiff_tiled.tif",
        "tiff_orientation_6.tif",
        "jpeg_cmyk.jpg",
        "control.jpg",
        "control.png",
    ] {
        assert!(rows.iter().any(|r| r[0] == name), "{name} missing");
        assert!(has_image_extension(Path::new(name)), "{name}");
    }
}

/// A JPEG 2000 file whose SIZ marker claims 60000x60000 pixels is refused from its header.
#[test]
fn jpeg2000_bomb_and_truncation_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    oracle(dir.path());
    let bytes = std::fs::read(dir.path().join("j2k_codestream_rgb.j2k")).unwrap();
    // SIZ: FF4F FF51, Lsiz (2), Rsiz (2), Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (4 each): the
    // image and its one tile claim 60000x60000.
    let mut bomb = bytes.clone();
    for at in [8, 12, 24, 28] {
        bomb[at..at + 4].copy_from_slice(&60000u32.to_be_bytes());
    }
    let path = dir.path().join("bomb.j2k");
    std::fs::write(&path, &bomb).unwrap();
    let err = read_bgr(&path).unwrap_err().to_string();
    assert!(
        err.contains("bomb.j2k") && err.contains("60000x60000"),
        "{err}"
    );
    let cut = dir.path().join("cut.jp2");
    let jp2 = std::fs::read(dir.path().join("j2k_lossless_rgb.jp2")).unwrap();
    std::fs::write(&cut, &jp2[..jp2.len() / 2]).unwrap();
    let err = read_bgr(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.jp2"), "{err}");
}

/// TIFF: a header claiming a huge image, and a file cut in the middle of its pixels.
#[test]
fn tiff_bomb_and_truncation_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    oracle(dir.path());
    let bytes = std::fs::read(dir.path().join("tiff_16bit_rgb.tif")).unwrap();
    // The first IFD: patch its ImageWidth and ImageLength entries (little-endian file).
    assert_eq!(&bytes[..4], b"II*\0");
    let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let count = u16::from_le_bytes([bytes[ifd], bytes[ifd + 1]]) as usize;
    let mut bomb = bytes.clone();
    for e in 0..count {
        let at = ifd + 2 + e * 12;
        let tag = u16::from_le_bytes([bomb[at], bomb[at + 1]]);
        if tag == 256 || tag == 257 {
            // Type LONG, count 1, the value.
            bomb[at + 2..at + 4].copy_from_slice(&4u16.to_le_bytes());
            bomb[at + 8..at + 12].copy_from_slice(&70000u32.to_le_bytes());
        }
    }
    let path = dir.path().join("bomb.tif");
    std::fs::write(&path, &bomb).unwrap();
    let err = read_bgr(&path).unwrap_err().to_string();
    assert!(
        err.contains("bomb.tif") && err.contains("70000x70000"),
        "{err}"
    );
    let cut = dir.path().join("cut.tif");
    let jpeg_tiff = std::fs::read(dir.path().join("tiff_jpeg_ycbcr.tif")).unwrap();
    std::fs::write(&cut, &jpeg_tiff[..jpeg_tiff.len() * 2 / 3]).unwrap();
    let err = read_bgr(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.tif"), "{err}");
}

/// PBM/PGM/PPM: a header claiming a huge image, a file cut short, a stray byte among ASCII
/// samples.
#[test]
fn pnm_bomb_and_truncation_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "bomb.ppm",
            b"P6\n60000 60000\n255\n\x01\x02\x03",
            "60000x60000",
        ),
        ("cut.pgm", b"P5 4 4 255\n\x01\x02\x03", "cut short"),
        ("stray.pgm", b"P2 2 1 255\n1 x", "unexpected byte"),
        (
            "wide.pgm",
            b"P5 2 1 70000\n\x01\x02\x03\x04",
            "maximum value 70000",
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = read_bgr(&path).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(reason), "{err}");
    }
}
