//! Reading image files the way the original did: `cv2.imread` (3-channel BGR, 8 bit) followed by
//! `cv2.resize` to the model's input size.

use std::path::Path;

use super::jpeg::{self, Jpeg};
use super::resize::resize_linear;

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

/// A decoded image: interleaved BGR bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bgr8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Image file extensions that `trainer` looks at when it scans folders (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

/// True when the path has one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

/// Decodes an encoded image into 8-bit BGR, as `cv2.imread(path)` does: JPEG through
/// libjpeg-turbo (the same pixels), other formats through the `image` crate; grayscale is
/// replicated into three channels, alpha is dropped, 16-bit samples keep their high byte.
pub fn decode_bgr(bytes: &[u8], path: &Path) -> Result<Bgr8, DecodeError> {
    let name = || path.display().to_string();
    if bytes.is_empty() {
        return Err(DecodeError::Empty { path: name() });
    }
    if jpeg::is_jpeg(bytes) {
        match jpeg::decode_bgr(bytes) {
            Ok(Jpeg::Bgr(width, height, data)) => {
                return Ok(Bgr8 {
                    width,
                    height,
                    data,
                })
            }
            Ok(Jpeg::Unsupported) => {}
            Err(reason) => {
                return Err(DecodeError::Invalid {
                    path: name(),
                    reason,
                })
            }
        }
    }
    let img = image::load_from_memory(bytes).map_err(|e| DecodeError::Invalid {
        path: name(),
        reason: e.to_string(),
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(DecodeError::Invalid {
            path: name(),
            reason: "zero-sized image".into(),
        });
    }
    let rgb = img.into_rgb8();
    let mut data = rgb.into_raw();
    for px in data.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    Ok(Bgr8 {
        width,
        height,
        data,
    })
}

/// Reads and decodes an image file into BGR.
pub fn read_bgr(path: &Path) -> Result<Bgr8, DecodeError> {
    let bytes = std::fs::read(path).map_err(|source| DecodeError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_bgr(&bytes, path)
}

/// `cv2.resize(cv2.imread(path), (size, size))`: the model's uint8 input, HWC BGR.
pub fn load_resized(path: &Path, size: usize) -> Result<Vec<u8>, DecodeError> {
    let img = read_bgr(path)?;
    Ok(resize_linear(
        &img.data, img.width, img.height, 3, size, size,
    ))
}
