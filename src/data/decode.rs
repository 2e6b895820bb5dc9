//! Reading image files the way the original did: `cv2.imread` (3-channel BGR, 8 bit) followed by
//! `cv2.resize` to the model's input size.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use image::metadata::Orientation;

use super::resize::resize_linear;
use super::{jp2, jpeg, pnm, tiff};

/// Default largest image, in pixels, that is decoded: 100 megapixels (300 MB of BGR bytes). A
/// decompression bomb (a tiny file whose header claims a huge image) is refused from its header.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;
/// Largest image file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_PIXELS);

/// Sets the pixel limit for every decode in this process (`--max-pixels`).
pub fn set_max_pixels(limit: u64) {
    MAX_PIXELS.store(limit.max(1), Ordering::Relaxed);
}

/// The pixel limit in force.
pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(Ordering::Relaxed)
}

/// Refuses dimensions above the pixel limit, before anything is allocated for them.
fn check_size(width: u64, height: u64) -> Result<(), String> {
    let limit = max_pixels();
    if width == 0 || height == 0 {
        return Err("zero-sized image".into());
    }
    if width.saturating_mul(height) > limit {
        return Err(format!(
            "{width}x{height} pixels is more than the limit of {limit} pixels (--max-pixels)"
        ));
    }
    Ok(())
}

/// Why an image file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: cannot read file: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: empty file")]
    Empty { path: String },
    #[error("{path}: not a readable image ({reason})")]
    Invalid { path: String, reason: String },
}

impl DecodeError {
    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// A decoded image: interleaved BGR bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bgr8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Image file extensions of the formats `trainer` reads (case-insensitive): those `cv2.imread`
/// reads (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000, PBM/PGM/PPM), and GIF.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "png", "bmp", "tif", "tiff", "webp", "jp2", "j2k", "j2c", "jpc", "pbm",
    "pgm", "ppm", "pnm", "gif",
];

/// True when the path has one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

/// Decodes an encoded image into 8-bit BGR, as `cv2.imread(path)` does, choosing the decoder
/// from the first bytes as OpenCV does: JPEG through libjpeg-turbo, TIFF through libtiff, JPEG
/// 2000 through OpenJPEG (the libraries OpenCV links, converted as OpenCV converts), PBM/PGM/PPM
/// as OpenCV's own reader, PNG, BMP, WebP and GIF through the `image` crate; grayscale is
/// replicated into three channels, alpha is dropped, 16-bit PNG samples keep their high byte.
pub fn decode_bgr(bytes: &[u8], path: &Path) -> Result<Bgr8, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty {
            path: path.display().to_string(),
        });
    }
    let invalid = |reason: String| DecodeError::invalid(path, reason);
    let (width, height, data) = if jpeg::is_jpeg(bytes) {
        let (width, height, data) = jpeg::decode_bgr(bytes, check_size).map_err(invalid)?;
        let orientation = jpeg::exif_tiff(bytes)
            .and_then(Orientation::from_exif_chunk)
            .unwrap_or(Orientation::NoTransforms);
        let img = Bgr8 {
            width,
            height,
            data,
        };
        return Ok(orient(img, orientation));
    } else if tiff::is_tiff(bytes) {
        tiff::decode_bgr(bytes, max_alloc(), check_size).map_err(invalid)?
    } else if jp2::is_jpeg2000(bytes) {
        jp2::decode_bgr(bytes, check_size).map_err(invalid)?
    } else if pnm::is_pnm(bytes) {
        pnm::decode_bgr(bytes, check_size).map_err(invalid)?
    } else {
        let img = decode_other(bytes).map_err(invalid)?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        (width, height, to_bgr8(img))
    };
    Ok(Bgr8 {
        width,
        height,
        data,
    })
}

/// The most one decoder may allocate at once: 16-bit RGBA, the widest sample layout, is 8 bytes a
/// pixel, plus the decoder's own buffers.
fn max_alloc() -> u64 {
    max_pixels().saturating_mul(16)
}

/// 8-bit BGR from the `image` crate's decoded image: 16-bit samples keep their high byte (as
/// libpng's `png_set_strip_16`, which OpenCV's PNG reader uses), alpha is dropped.
fn to_bgr8(img: image::DynamicImage) -> Vec<u8> {
    use image::DynamicImage as D;
    let high = |samples: &[u16], channels: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(samples.len() / channels * 3);
        for px in samples.chunks_exact(channels) {
            let v = |i: usize| (px[i] >> 8) as u8;
            if channels < 3 {
                out.extend([v(0), v(0), v(0)]);
            } else {
                out.extend([v(2), v(1), v(0)]);
            }
        }
        out
    };
    match &img {
        D::ImageLuma16(b) => return high(b.as_raw(), 1),
        D::ImageLumaA16(b) => return high(b.as_raw(), 2),
        D::ImageRgb16(b) => return high(b.as_raw(), 3),
        D::ImageRgba16(b) => return high(b.as_raw(), 4),
        _ => {}
    }
    let mut data = img.into_rgb8().into_raw();
    for px in data.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    data
}

/// PNG, BMP, WebP and GIF through the `image` crate: dimensions checked from the header first, then
/// decoded with an allocation limit, then turned upright by the file's EXIF orientation.
fn decode_other(bytes: &[u8]) -> Result<image::DynamicImage, String> {
    use image::ImageDecoder;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_alloc());
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Turns a decoded image upright as `cv2.imread` does with the EXIF orientation tag (2: mirror,
/// 3: rotate 180, 4: flip, 5: transpose, 6: rotate 90 clockwise, 7: transverse, 8: rotate 90
/// counter-clockwise).
pub fn orient(img: Bgr8, orientation: Orientation) -> Bgr8 {
    if orientation == Orientation::NoTransforms {
        return img;
    }
    let Some(buf) = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data) else {
        unreachable!("a decoded image holds width * height * 3 bytes");
    };
    let mut dynamic = image::DynamicImage::ImageRgb8(buf);
    dynamic.apply_orientation(orientation);
    let (width, height) = (dynamic.width() as usize, dynamic.height() as usize);
    Bgr8 {
        width,
        height,
        data: dynamic.into_rgb8().into_raw(),
    }
}

/// Reads and decodes an image file into BGR. A broken or looping symbolic link, a folder, a
/// device or a pipe is reported like any unreadable file, and at most [`MAX_FILE_BYTES`] are read.
pub fn read_bgr(path: &Path) -> Result<Bgr8, DecodeError> {
    let io = |source| DecodeError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if link {
            DecodeError::invalid(path, format!("broken or looping symbolic link ({e})"))
        } else {
            io(e)
        }
    })?;
    if !meta.is_file() {
        return Err(DecodeError::invalid(path, "not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        let reason = format!(
            "{} bytes, more than the limit of {MAX_FILE_BYTES}",
            meta.len()
        );
        return Err(DecodeError::invalid(path, reason));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(io)?;
    decode_bgr(&bytes, path)
}

/// `cv2.resize(cv2.imread(path), (size, size))`: the model's uint8 input, HWC BGR.
pub fn load_resized(path: &Path, size: usize) -> Result<Vec<u8>, DecodeError> {
    let img = read_bgr(path)?;
    Ok(resize_linear(
        &img.data, img.width, img.height, 3, size, size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small image whose every pixel differs, so any wrong transform shows.
    fn pattern(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 40) as u8, (y * 60) as u8, 128])
        })
    }

    fn jpeg_of(img: &image::RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100)
            .encode_image(img)
            .unwrap();
        out
    }

    /// The JPEG with an EXIF segment holding only the orientation tag, right after SOI.
    fn with_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        tiff.extend([0x01, 0x12, 0, 3, 0, 0, 0, 1]);
        tiff.extend(value.to_be_bytes());
        tiff.extend([0, 0, 0, 0, 0, 0]);
        let mut segment = b"Exif\0\0".to_vec();
        segment.extend(tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend([0xFF, 0xE1]);
        out.extend(((segment.len() + 2) as u16).to_be_bytes());
        out.extend(segment);
        out.extend(&jpeg[2..]);
        out
    }

    /// OpenCV's `ApplyExifOrientation`, written out pixel by pixel.
    fn opencv_orient(src: &Bgr8, o: u16) -> Bgr8 {
        let (w, h) = (src.width, src.height);
        let (ow, oh) = if (5..=8).contains(&o) { (h, w) } else { (w, h) };
        let mut data = Vec::with_capacity(src.data.len());
        for y in 0..oh {
            for x in 0..ow {
                let (sx, sy) = match o {
                    2 => (w - 1 - x, y),
                    3 => (w - 1 - x, h - 1 - y),
                    4 => (x, h - 1 - y),
                    5 => (y, x),
                    6 => (y, h - 1 - x),
                    7 => (w - 1 - y, h - 1 - x),
                    8 => (w - 1 - y, x),
                    _ => (x, y),
                };
                let i = (sy * w + sx) * 3;
                data.extend_from_slice(&src.data[i..i + 3]);
            }
        }
        Bgr8 {
            width: ow,
            height: oh,
            data,
        }
    }

    #[test]
    fn exif_orientation_is_applied_as_opencv_does_for_every_value() {
        let jpeg = jpeg_of(&pattern(5, 3));
        let upright = decode_bgr(&jpeg, Path::new("plain.jpg")).unwrap();
        assert_eq!((upright.width, upright.height), (5, 3));
        for o in 0..=9u16 {
            let tagged = with_orientation(&jpeg, o);
            let got = decode_bgr(&tagged, Path::new("tagged.jpg")).unwrap();
            assert_eq!(got, opencv_orient(&upright, o), "orientation {o}");
        }
    }

    #[test]
    fn exif_walker_survives_hostile_segments() {
        let jpeg = jpeg_of(&pattern(4, 4));
        // A segment length running past the end, a length below 2, a bare SOI.
        let mut long = jpeg[..2].to_vec();
        long.extend([0xFF, 0xE1, 0xFF, 0xFF, b'E', b'x']);
        assert_eq!(jpeg::exif_tiff(&long), None);
        let mut short = jpeg[..2].to_vec();
        short.extend([0xFF, 0xE1, 0x00, 0x01]);
        assert_eq!(jpeg::exif_tiff(&short), None);
        assert_eq!(jpeg::exif_tiff(&[0xFF, 0xD8]), None);
        // An IFD offset far outside the segment is no orientation, and the image still decodes.
        let mut bad = with_orientation(&jpeg, 6);
        bad[2 + 4 + 6 + 4..2 + 4 + 6 + 8].copy_from_slice(&[0x7F, 0xFF, 0xFF, 0xFF]);
        let img = decode_bgr(&bad, Path::new("bad.jpg")).unwrap();
        assert_eq!((img.width, img.height), (4, 4));
    }

    /// The JPEG with its frame header claiming `w` x `h` pixels.
    fn claiming(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
        let mut out = jpeg.to_vec();
        let sof = out
            .windows(2)
            .position(|m| m[0] == 0xFF && (m[1] == 0xC0 || m[1] == 0xC2))
            .unwrap();
        out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
        out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
        out
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        let bomb = claiming(&jpeg_of(&pattern(8, 8)), 65000, 65000);
        let err = decode_bgr(&bomb, Path::new("bomb.jpg"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.jpg") && err.contains("65000x65000"),
            "{err}"
        );
        assert!(err.contains("--max-pixels"), "{err}");

        let mut png = Vec::new();
        pattern(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        // IHDR data starts at byte 16; its CRC covers the type and the data (bytes 12..29).
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode_bgr(&png, Path::new("bomb.png"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.png") && err.contains("100000x100000"),
            "{err}"
        );
    }

    #[test]
    fn sixteen_bit_png_keeps_the_high_byte_and_drops_alpha() {
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_raw(
            2,
            1,
            vec![
                0x12ff, 0x3480, 0x567f, 0x0001, 0xffff, 0x00ff, 0x8000, 0xabcd,
            ],
        )
        .unwrap();
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba16(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let got = decode_bgr(&png, Path::new("deep.png")).unwrap();
        // Rounding would give 0x13 for 0x12ff and 1 for 0x00ff; the high byte is kept.
        assert_eq!(got.data, [0x56, 0x34, 0x12, 0x80, 0x00, 0xff]);
    }
}
