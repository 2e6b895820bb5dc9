//! JPEG decoding through libjpeg-turbo's TurboJPEG API, the decoder `cv2.imread` uses: accurate
//! integer IDCT and "fancy" chroma upsampling, so the pixels are the ones the original saw.

use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void, CStr};

type TjHandle = *mut c_void;

const TJPF_BGR: c_int = 1;
const TJPF_CMYK: c_int = 11;
const TJERR_WARNING: c_int = 0;
/// `TJCS_CMYK` and `TJCS_YCCK`: decoded to CMYK, then to BGR as OpenCV does.
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

/// Decodes a JPEG into BGR: width, height and bytes. `check` sees the header's width and height
/// before any pixel memory is allocated and may refuse them. A file cut short is an error, like
/// any fatal libjpeg error; other libjpeg warnings (stray bytes between markers) are tolerated as
/// `cv2.imread` does. A CMYK or YCCK JPEG is decoded to libjpeg's CMYK output (YCCK converted by
/// libjpeg) and then to BGR by [`cmyk_to_bgr`], as OpenCV's JPEG reader does.
pub fn decode_bgr(
    bytes: &[u8],
    check: impl Fn(u64, u64) -> Result<(), String>,
) -> Result<(usize, usize, Vec<u8>), String> {
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
    let cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
    if w <= 0 || h <= 0 {
        return Err("zero-sized image".into());
    }
    check(w as u64, h as u64)?;
    let (width, height) = (w as usize, h as usize);
    let (channels, format) = if cmyk { (4, TJPF_CMYK) } else { (3, TJPF_BGR) };
    let mut out = vec![0u8; width * height * channels];
    // SAFETY: `out` holds exactly width * height * channels bytes, the size TurboJPEG writes for
    // this pixel format.
    let rc = unsafe {
        tjDecompress2(
            handle.0,
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            out.as_mut_ptr(),
            w,
            0,
            h,
            format,
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
    if cmyk {
        out = cmyk_to_bgr(&out);
    }
    Ok((width, height, out))
}

/// OpenCV's `icvCvt_CMYK2BGR_8u_C4C3R` on libjpeg's CMYK samples (stored inverted, as Adobe
/// writes them): each of C, M, Y becomes `k - ((255 - v) * k >> 8)`, written in B, G, R order
/// from Y, M, C.
pub fn cmyk_to_bgr(cmyk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = i32::from(px[3]);
        let f = |v: u8| (k - (((255 - i32::from(v)) * k) >> 8)) as u8;
        out.extend([f(px[2]), f(px[1]), f(px[0])]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_is_opencvs_integer_formula() {
        // Adobe CMYK is stored inverted: 255 is no ink. K = 255 nearly keeps C, M, Y as R, G, B
        // (255 -> 255, 128 -> 255 - (127 * 255 >> 8) = 129, 0 -> 255 - 254 = 1); K = 0 is black.
        assert_eq!(cmyk_to_bgr(&[255, 128, 0, 255]), [1, 129, 255]);
        assert_eq!(cmyk_to_bgr(&[200, 100, 50, 0]), [0, 0, 0]);
        // k - ((255 - v) * k >> 8) for v = 10, 20, 30 and k = 100.
        let f = |v: i32| (100 - (((255 - v) * 100) >> 8)) as u8;
        assert_eq!(cmyk_to_bgr(&[10, 20, 30, 100]), [f(30), f(20), f(10)]);
        assert_eq!(cmyk_to_bgr(&[1, 2, 3, 4, 5, 6, 7, 8]).len(), 6);
    }
}
