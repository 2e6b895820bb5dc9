//! JPEG decoding through libjpeg-turbo's TurboJPEG API, the decoder `cv2.imread` uses: accurate
//! integer IDCT and "fancy" chroma upsampling, so the pixels are the ones the original saw.

use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void, CStr};

type TjHandle = *mut c_void;

const TJPF_BGR: c_int = 1;
const TJERR_WARNING: c_int = 0;
/// `TJCS_CMYK` and `TJCS_YCCK`: TurboJPEG cannot turn these into BGR.
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;

#[link(name = "turbojpeg")]
extern "C" {
    fn tjInitDecompress() -> TjHandle;
    fn tjDestroy(handle: TjHandle) -> c_int;
    fn tjDecompressHeader3(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        subsamp: *mut c_int,
        colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_buf: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetErrorStr2(handle: TjHandle) -> *mut c_char;
    fn tjGetErrorCode(handle: TjHandle) -> c_int;
}

/// Outcome of a JPEG decode.
pub enum Jpeg {
    /// Width, height and BGR bytes.
    Bgr(usize, usize, Vec<u8>),
    /// A CMYK/YCCK JPEG, which TurboJPEG cannot convert: decode it some other way.
    Unsupported,
}

struct Handle(TjHandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe { tjDestroy(self.0) };
    }
}

impl Handle {
    fn error(&self) -> String {
        // SAFETY: tjGetErrorStr2 returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tjGetErrorStr2(self.0)) }
            .to_string_lossy()
            .into_owned()
    }
}

/// True when the bytes start with a JPEG SOI marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// The TIFF part of the first EXIF segment (APP1 starting with `Exif\0\0`) before the image
/// data, as OpenCV's JPEG reader finds it; `None` when there is none. Every length is checked.
pub fn exif_tiff(bytes: &[u8]) -> Option<&[u8]> {
    let mut pos = 2; // after SOI
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        if bytes.get(pos) != Some(&0xFF) {
            return None;
        }
        let marker = *bytes.get(pos + 1)?;
        match marker {
            0xDA | 0xD9 => return None, // start of scan, end of image
            0x01 | 0xD0..=0xD7 => {
                pos += 2;
                continue;
            }
            _ => {}
        }
        let len = u16::from_be_bytes([*bytes.get(pos + 2)?, *bytes.get(pos + 3)?]) as usize;
        if len < 2 {
            return None;
        }
        let segment = bytes.get(pos + 4..pos + 2 + len)?;
        if marker == 0xE1 {
            if let Some(tiff) = segment.strip_prefix(b"Exif\0\0") {
                return Some(tiff);
            }
        }
        pos += 2 + len;
    }
}

/// Decodes a JPEG into BGR. `check` sees the header's width and height before any pixel memory
/// is allocated and may refuse them. A file cut short is an error, like any fatal libjpeg error;
/// other libjpeg warnings (stray bytes between markers) are tolerated as `cv2.imread` does.
pub fn decode_bgr(
    bytes: &[u8],
    check: impl Fn(u64, u64) -> Result<(), String>,
) -> Result<Jpeg, String> {
    // SAFETY: plain C call with no arguments.
    let handle = Handle(unsafe { tjInitDecompress() });
    if handle.0.is_null() {
        return Err("cannot initialise the JPEG decoder".into());
    }
    let (mut w, mut h, mut subsamp, mut colorspace) = (0, 0, 0, 0);
    // SAFETY: the buffer pointer and length describe `bytes`; outputs are valid locals.
    let rc = unsafe {
        tjDecompressHeader3(
            handle.0,
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            &mut w,
            &mut h,
            &mut subsamp,
            &mut colorspace,
        )
    };
    if rc != 0 {
        return Err(handle.error());
    }
    if colorspace == TJCS_CMYK || colorspace == TJCS_YCCK {
        return Ok(Jpeg::Unsupported);
    }
    if w <= 0 || h <= 0 {
        return Err("zero-sized image".into());
    }
    check(w as u64, h as u64)?;
    let (width, height) = (w as usize, h as usize);
    let mut out = vec![0u8; width * height * 3];
    // SAFETY: `out` holds exactly width * height * 3 bytes, the size TurboJPEG writes for BGR.
    let rc = unsafe {
        tjDecompress2(
            handle.0,
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            out.as_mut_ptr(),
            w,
            0,
            h,
            TJPF_BGR,
            0,
        )
    };
    if rc != 0 {
        let message = handle.error();
        // SAFETY: plain query on a live handle.
        let warning_only = unsafe { tjGetErrorCode(handle.0) } == TJERR_WARNING;
        if !warning_only || message.contains("Premature end") {
            return Err(message);
        }
    }
    Ok(Jpeg::Bgr(width, height, out))
}
