//! JPEG 2000 (`.jp2` files and `.j2k` codestreams) through OpenJPEG, the library `cv2.imread`
//! links, converted to 8-bit BGR as OpenCV's `Jpeg2KOpjDecoder` does: every component shifted
//! right by (largest precision - 8), sRGB (or unspecified) components 0, 1, 2 as R, G, B,
//! sYCC ones through OpenCV's integer YUV-to-BGR conversion, grayscale replicated, alpha dropped.

use std::ffi::{c_char, c_int, c_void};

const OPJ_CODEC_J2K: c_int = 0;
const OPJ_CODEC_JP2: c_int = 2;
const OPJ_CLRSPC_UNKNOWN: c_int = -1;
const OPJ_CLRSPC_UNSPECIFIED: c_int = 0;
const OPJ_CLRSPC_SRGB: c_int = 1;
const OPJ_CLRSPC_GRAY: c_int = 2;
const OPJ_CLRSPC_SYCC: c_int = 3;

#[repr(C)]
struct OpjComp {
    dx: u32,
    dy: u32,
    w: u32,
    h: u32,
    x0: u32,
    y0: u32,
    prec: u32,
    bpp: u32,
    sgnd: u32,
    resno_decoded: u32,
    factor: u32,
    data: *mut i32,
    alpha: u16,
}

#[repr(C)]
struct OpjImage {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
    numcomps: u32,
    color_space: c_int,
    comps: *mut OpjComp,
    icc_profile_buf: *mut u8,
    icc_profile_len: u32,
}

type ReadFn = unsafe extern "C" fn(*mut c_void, usize, *mut c_void) -> usize;
type SkipFn = unsafe extern "C" fn(i64, *mut c_void) -> i64;
type SeekFn = unsafe extern "C" fn(i64, *mut c_void) -> c_int;
type MsgFn = unsafe extern "C" fn(*const c_char, *mut c_void);

#[link(name = "openjp2")]
extern "C" {
    fn opj_stream_default_create(is_input: c_int) -> *mut c_void;
    fn opj_stream_destroy(stream: *mut c_void);
    fn opj_stream_set_read_function(stream: *mut c_void, f: ReadFn);
    fn opj_stream_set_skip_function(stream: *mut c_void, f: SkipFn);
    fn opj_stream_set_seek_function(stream: *mut c_void, f: SeekFn);
    fn opj_stream_set_user_data(stream: *mut c_void, data: *mut c_void, free: *const c_void);
    fn opj_stream_set_user_data_length(stream: *mut c_void, len: u64);
    fn opj_create_decompress(format: c_int) -> *mut c_void;
    fn opj_destroy_codec(codec: *mut c_void);
    fn opj_set_default_decoder_parameters(params: *mut c_void);
    fn opj_setup_decoder(codec: *mut c_void, params: *mut c_void) -> c_int;
    fn opj_set_error_handler(codec: *mut c_void, f: MsgFn, user: *mut c_void) -> c_int;
    fn opj_set_warning_handler(codec: *mut c_void, f: MsgFn, user: *mut c_void) -> c_int;
    fn opj_read_header(stream: *mut c_void, codec: *mut c_void, image: *mut *mut OpjImage)
        -> c_int;
    fn opj_decode(codec: *mut c_void, stream: *mut c_void, image: *mut OpjImage) -> c_int;
    fn opj_image_destroy(image: *mut OpjImage);
}

/// The JP2 file signature box, and the start of a raw codestream (SOC then SIZ).
const JP2_SIGNATURE: [u8; 12] = [0, 0, 0, 0x0C, b'j', b'P', b' ', b' ', 13, 10, 0x87, 10];
const J2K_SIGNATURE: [u8; 4] = [0xFF, 0x4F, 0xFF, 0x51];

/// True when the bytes are a JP2 file or a JPEG 2000 codestream (the signatures OpenCV checks).
pub fn is_jpeg2000(bytes: &[u8]) -> bool {
    bytes.starts_with(&JP2_SIGNATURE) || bytes.starts_with(&J2K_SIGNATURE)
}

/// The bytes OpenJPEG reads from, and where it is.
struct Source<'a> {
    bytes: &'a [u8],
    pos: usize,
}

unsafe extern "C" fn read(buf: *mut c_void, n: usize, user: *mut c_void) -> usize {
    // SAFETY: `user` is the `Source` given to the stream, alive for the whole decode; OpenJPEG
    // hands a buffer of at least `n` bytes.
    let src = unsafe { &mut *(user as *mut Source) };
    let take = n.min(src.bytes.len() - src.pos);
    if take == 0 {
        return usize::MAX; // end of stream, as OpenJPEG expects
    }
    unsafe { std::ptr::copy_nonoverlapping(src.bytes.as_ptr().add(src.pos), buf as *mut u8, take) };
    src.pos += take;
    take
}

unsafe extern "C" fn skip(n: i64, user: *mut c_void) -> i64 {
    // SAFETY: as in `read`.
    let src = unsafe { &mut *(user as *mut Source) };
    let left = (src.bytes.len() - src.pos) as i64;
    let step = n.clamp(0, left);
    if step == 0 {
        return -1;
    }
    src.pos += step as usize;
    step
}

unsafe extern "C" fn seek(to: i64, user: *mut c_void) -> c_int {
    // SAFETY: as in `read`.
    let src = unsafe { &mut *(user as *mut Source) };
    if to < 0 || to as u64 > src.bytes.len() as u64 {
        return 0;
    }
    src.pos = to as usize;
    1
}

/// OpenJPEG's error messages, the last one kept for the report.
unsafe extern "C" fn on_error(msg: *const c_char, user: *mut c_void) {
    // SAFETY: `user` is the `String` given with the handler; `msg` is a NUL-terminated string.
    let last = unsafe { &mut *(user as *mut String) };
    *last = unsafe { std::ffi::CStr::from_ptr(msg) }
        .to_string_lossy()
        .trim()
        .to_string();
}

unsafe extern "C" fn on_warning(_msg: *const c_char, _user: *mut c_void) {}

/// Owns the stream, the codec and the image, destroyed in that order's reverse.
struct Decoder {
    stream: *mut c_void,
    codec: *mut c_void,
    image: *mut OpjImage,
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or came from its OpenJPEG constructor, destroyed once.
        unsafe {
            if !self.image.is_null() {
                opj_image_destroy(self.image);
            }
            if !self.codec.is_null() {
                opj_destroy_codec(self.codec);
            }
            if !self.stream.is_null() {
                opj_stream_destroy(self.stream);
            }
        }
    }
}

/// Decodes a JPEG 2000 image into BGR. `check` sees the header's width and height before any
/// pixel memory is allocated and may refuse them.
pub fn decode_bgr(
    bytes: &[u8],
    check: impl Fn(u64, u64) -> Result<(), String>,
) -> Result<(usize, usize, Vec<u8>), String> {
    let format = if bytes.starts_with(&JP2_SIGNATURE) {
        OPJ_CODEC_JP2
    } else {
        OPJ_CODEC_J2K
    };
    let mut source = Source { bytes, pos: 0 };
    let mut last_error = String::new();
    let fail = |what: &str, last: &String| {
        if last.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {last}")
        }
    };
    // SAFETY: plain constructors; every pointer is checked before use and owned by `dec`.
    let mut dec = unsafe {
        Decoder {
            stream: opj_stream_default_create(1),
            codec: opj_create_decompress(format),
            image: std::ptr::null_mut(),
        }
    };
    if dec.stream.is_null() || dec.codec.is_null() {
        return Err("cannot initialise the JPEG 2000 decoder".into());
    }
    // The parameters struct is about 8 KiB; this buffer is larger and suitably aligned.
    let mut params = vec![0u64; 2048];
    // SAFETY: `source` and `last_error` outlive `dec` (declared before it), so the callbacks'
    // user pointers stay valid; the parameter buffer is larger than `opj_dparameters_t`.
    let ok = unsafe {
        opj_stream_set_user_data(
            dec.stream,
            &mut source as *mut Source as *mut c_void,
            std::ptr::null(),
        );
        opj_stream_set_user_data_length(dec.stream, bytes.len() as u64);
        opj_stream_set_read_function(dec.stream, read);
        opj_stream_set_skip_function(dec.stream, skip);
        opj_stream_set_seek_function(dec.stream, seek);
        let user = &mut last_error as *mut String as *mut c_void;
        opj_set_error_handler(dec.codec, on_error, user);
        opj_set_warning_handler(dec.codec, on_warning, std::ptr::null_mut());
        opj_set_default_decoder_parameters(params.as_mut_ptr() as *mut c_void);
        opj_setup_decoder(dec.codec, params.as_mut_ptr() as *mut c_void) != 0
            && opj_read_header(dec.stream, dec.codec, &mut dec.image) != 0
    };
    if !ok || dec.image.is_null() {
        return Err(fail("bad JPEG 2000 header", &last_error));
    }
    // SAFETY: opj_read_header filled a valid image.
    let (width, height) = {
        let img = unsafe { &*dec.image };
        (
            img.x1.saturating_sub(img.x0) as u64,
            img.y1.saturating_sub(img.y0) as u64,
        )
    };
    check(width, height)?;
    let shift = header_shift(unsafe { &*dec.image })?;
    // SAFETY: the codec, stream and image are the ones opj_read_header used.
    if unsafe { opj_decode(dec.codec, dec.stream, dec.image) } == 0 {
        return Err(fail("JPEG 2000 decoding failed", &last_error));
    }
    // SAFETY: after a successful decode the image and its components are valid.
    let img = unsafe { &*dec.image };
    let comps = unsafe { std::slice::from_raw_parts(img.comps, img.numcomps as usize) };
    let data = to_bgr(
        img.color_space,
        comps,
        width as usize,
        height as usize,
        shift,
    )?;
    Ok((width as usize, height as usize, data))
}

/// OpenCV's header checks: 1 to 4 unsigned components, at most one alpha, the largest
/// precision at least 8; returns the right shift that brings that precision to 8 bits.
fn header_shift(img: &OpjImage) -> Result<u32, String> {
    let n = img.numcomps as usize;
    if !(1..=4).contains(&n) || img.comps.is_null() {
        return Err(format!("{n} components (1 to 4 are read)"));
    }
    // SAFETY: opj_read_header allocated `numcomps` component descriptions.
    let comps = unsafe { std::slice::from_raw_parts(img.comps, n) };
    if comps.iter().any(|c| c.sgnd != 0) {
        return Err("signed components are not read".into());
    }
    if comps.iter().filter(|c| c.alpha != 0).count() > 1 {
        return Err("more than one alpha component".into());
    }
    let max_prec = comps.iter().map(|c| c.prec).max().unwrap_or(0);
    if !(8..=64).contains(&max_prec) {
        return Err(format!("{max_prec}-bit components (8 to 64 are read)"));
    }
    Ok(max_prec - 8)
}

/// The decoded components as interleaved BGR: each must cover the whole image unsubsampled.
fn to_bgr(
    color_space: c_int,
    comps: &[OpjComp],
    width: usize,
    height: usize,
    shift: u32,
) -> Result<Vec<u8>, String> {
    for c in comps {
        let whole = (c.dx, c.dy, c.x0, c.y0) == (1, 1, 0, 0)
            && c.w as usize == width
            && c.h as usize == height;
        if !whole || c.data.is_null() {
            return Err("subsampled, offset or missing components are not read".into());
        }
    }
    let plane = |i: usize| {
        // SAFETY: a whole component holds w * h samples (checked above).
        unsafe { std::slice::from_raw_parts(comps[i].data, width * height) }
    };
    // B, G, R source planes, as OpenCV picks them for its output.
    let order = match color_space {
        OPJ_CLRSPC_SYCC if comps.len() >= 3 => [0, 1, 2],
        OPJ_CLRSPC_UNKNOWN | OPJ_CLRSPC_UNSPECIFIED | OPJ_CLRSPC_SRGB if comps.len() >= 3 => {
            [2, 1, 0]
        }
        OPJ_CLRSPC_GRAY => [0, 0, 0],
        OPJ_CLRSPC_UNKNOWN | OPJ_CLRSPC_UNSPECIFIED | OPJ_CLRSPC_SRGB => {
            return Err(format!(
                "{} components in an RGB image (3 or 4 are read)",
                comps.len()
            ))
        }
        other => {
            return Err(format!(
                "colour space {other} is not read (sRGB and grey are)"
            ))
        }
    };
    let planes = order.map(plane);
    let mut out = Vec::with_capacity(width * height * 3);
    for i in 0..width * height {
        for p in &planes {
            // OpenCV's static_cast<uchar>(value >> shift): the low byte of the shifted value.
            out.push((p[i] >> shift) as u8);
        }
    }
    if color_space == OPJ_CLRSPC_SYCC {
        for px in out.chunks_exact_mut(3) {
            px.copy_from_slice(&yuv_to_bgr(px[0], px[1], px[2]));
        }
    }
    Ok(out)
}

/// OpenCV's `cvtColor(COLOR_YUV2BGR)` on 8-bit samples: fixed point with 14 fraction bits,
/// rounded, saturated.
fn yuv_to_bgr(y: u8, u: u8, v: u8) -> [u8; 3] {
    const U2B: i32 = 33292;
    const U2G: i32 = -6472;
    const V2G: i32 = -9519;
    const V2R: i32 = 18678;
    let descale = |x: i32| (x + (1 << 13)) >> 14;
    let (y, u, v) = (i32::from(y), i32::from(u) - 128, i32::from(v) - 128);
    let sat = |x: i32| x.clamp(0, 255) as u8;
    [
        sat(y + descale(u * U2B)),
        sat(y + descale(u * U2G + v * V2G)),
        sat(y + descale(v * V2R)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_recognised() {
        assert!(is_jpeg2000(&JP2_SIGNATURE));
        assert!(is_jpeg2000(&[0xFF, 0x4F, 0xFF, 0x51, 0, 0]));
        assert!(!is_jpeg2000(&[0xFF, 0xD8, 0xFF]));
        assert!(!is_jpeg2000(&JP2_SIGNATURE[..8]));
    }

    #[test]
    fn garbage_after_a_signature_is_an_error_not_a_crash() {
        let mut bytes = J2K_SIGNATURE.to_vec();
        bytes.extend([0x00, 0x29, 0, 0, 0, 0, 0, 0x10]);
        let err = decode_bgr(&bytes, |_, _| Ok(())).unwrap_err();
        assert!(err.contains("JPEG 2000"), "{err}");
        let err = decode_bgr(&JP2_SIGNATURE, |_, _| Ok(())).unwrap_err();
        assert!(err.contains("JPEG 2000"), "{err}");
    }
}
