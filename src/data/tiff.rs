//! TIFF through libtiff, as `cv2.imread` reads it into 8-bit BGR: OpenCV's header checks, then
//! libtiff's `TIFFReadRGBAStrip`/`TIFFReadRGBATile` (which do the colour work: palette, YCbCr,
//! JPEG compression, CMYK, 16-bit samples, alpha premultiplied), rows placed and the orientation
//! tag applied as OpenCV's `TiffDecoder` does, alpha dropped.

use std::ffi::{c_char, c_int, c_void};

type Tiff = c_void;
type ReadWriteProc = unsafe extern "C" fn(*mut c_void, *mut c_void, isize) -> isize;
type SeekProc = unsafe extern "C" fn(*mut c_void, u64, c_int) -> u64;
type CloseProc = unsafe extern "C" fn(*mut c_void) -> c_int;
type SizeProc = unsafe extern "C" fn(*mut c_void) -> u64;
type MapProc = unsafe extern "C" fn(*mut c_void, *mut *mut c_void, *mut u64) -> c_int;
type UnmapProc = unsafe extern "C" fn(*mut c_void, *mut c_void, u64);

#[link(name = "tiff")]
extern "C" {
    fn TIFFClientOpenExt(
        name: *const c_char,
        mode: *const c_char,
        handle: *mut c_void,
        read: ReadWriteProc,
        write: ReadWriteProc,
        seek: SeekProc,
        close: CloseProc,
        size: SizeProc,
        map: MapProc,
        unmap: UnmapProc,
        opts: *mut c_void,
    ) -> *mut Tiff;
    fn TIFFOpenOptionsAlloc() -> *mut c_void;
    fn TIFFOpenOptionsFree(opts: *mut c_void);
    fn TIFFOpenOptionsSetMaxSingleMemAlloc(opts: *mut c_void, max: isize);
    fn TIFFClose(tif: *mut Tiff);
    fn TIFFGetField(tif: *mut Tiff, tag: u32, ...) -> c_int;
    fn TIFFIsTiled(tif: *mut Tiff) -> c_int;
    fn TIFFRGBAImageOK(tif: *mut Tiff, emsg: *mut c_char) -> c_int;
    fn TIFFReadRGBAStrip(tif: *mut Tiff, row: u32, raster: *mut u32) -> c_int;
    fn TIFFReadRGBATile(tif: *mut Tiff, col: u32, row: u32, raster: *mut u32) -> c_int;
    fn TIFFSetErrorHandler(handler: *const c_void) -> *const c_void;
    fn TIFFSetWarningHandler(handler: *const c_void) -> *const c_void;
}

const TAG_IMAGEWIDTH: u32 = 256;
const TAG_IMAGELENGTH: u32 = 257;
const TAG_BITSPERSAMPLE: u32 = 258;
const TAG_PHOTOMETRIC: u32 = 262;
const TAG_ORIENTATION: u32 = 274;
const TAG_SAMPLESPERPIXEL: u32 = 277;
const TAG_ROWSPERSTRIP: u32 = 278;
const TAG_TILEWIDTH: u32 = 322;
const TAG_TILELENGTH: u32 = 323;
const TAG_SAMPLEFORMAT: u32 = 339;
const PHOTOMETRIC_PALETTE: u16 = 3;
const PHOTOMETRIC_MINISWHITE: u16 = 0;
const PHOTOMETRIC_MINISBLACK: u16 = 1;
const SAMPLEFORMAT_UINT: u16 = 1;
const SAMPLEFORMAT_INT: u16 = 2;
const SAMPLEFORMAT_IEEEFP: u16 = 3;

/// True when the bytes start with a TIFF or BigTIFF signature.
pub fn is_tiff(bytes: &[u8]) -> bool {
    [b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"]
        .iter()
        .any(|s| bytes.starts_with(*s))
}

/// The bytes libtiff reads from, and where it is.
struct Source<'a> {
    bytes: &'a [u8],
    pos: u64,
}

unsafe extern "C" fn read(handle: *mut c_void, buf: *mut c_void, n: isize) -> isize {
    // SAFETY: `handle` is the `Source` given to TIFFClientOpenExt, alive until TIFFClose;
    // libtiff hands a buffer of at least `n` bytes.
    let src = unsafe { &mut *(handle as *mut Source) };
    let left = src.bytes.len() as u64 - src.pos;
    let take = (n.max(0) as u64).min(left) as usize;
    let from = src.pos as usize;
    unsafe { std::ptr::copy_nonoverlapping(src.bytes.as_ptr().add(from), buf as *mut u8, take) };
    src.pos += take as u64;
    take as isize
}

unsafe extern "C" fn write(_: *mut c_void, _: *mut c_void, _: isize) -> isize {
    0
}

unsafe extern "C" fn seek(handle: *mut c_void, offset: u64, whence: c_int) -> u64 {
    // SAFETY: as in `read`.
    let src = unsafe { &mut *(handle as *mut Source) };
    let size = src.bytes.len() as u64;
    let to = match whence {
        1 => src.pos.wrapping_add(offset),
        2 => size.wrapping_add(offset),
        _ => offset,
    };
    // As OpenCV's buffer reader: a seek past the end stops at the end.
    src.pos = to.min(size);
    src.pos
}

unsafe extern "C" fn close(_: *mut c_void) -> c_int {
    0
}

unsafe extern "C" fn size(handle: *mut c_void) -> u64 {
    // SAFETY: as in `read`.
    unsafe { &*(handle as *mut Source) }.bytes.len() as u64
}

/// The whole file as libtiff's read-only "mapping" (libtiff 4.5.0 refuses uncompressed tiles
/// read through `read` alone; libtiff never writes to a file opened for reading).
unsafe extern "C" fn map(handle: *mut c_void, base: *mut *mut c_void, len: *mut u64) -> c_int {
    // SAFETY: as in `read`; libtiff hands valid out-pointers.
    let src = unsafe { &*(handle as *mut Source) };
    unsafe {
        *base = src.bytes.as_ptr() as *mut c_void;
        *len = src.bytes.len() as u64;
    }
    1
}

unsafe extern "C" fn unmap(_: *mut c_void, _: *mut c_void, _: u64) {}

/// An open libtiff handle, closed on drop.
struct Handle(*mut Tiff);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from TIFFClientOpenExt and is closed once.
        unsafe { TIFFClose(self.0) };
    }
}

impl Handle {
    fn u16(&self, tag: u32) -> Option<u16> {
        let mut v = 0u16;
        // SAFETY: these tags are read into a uint16_t.
        (unsafe { TIFFGetField(self.0, tag, &mut v as *mut u16) } != 0).then_some(v)
    }
    fn u32(&self, tag: u32) -> Option<u32> {
        let mut v = 0u32;
        // SAFETY: these tags are read into a uint32_t.
        (unsafe { TIFFGetField(self.0, tag, &mut v as *mut u32) } != 0).then_some(v)
    }
}

/// Decodes a TIFF's first page into BGR. `check` sees the width and height (and the size of a
/// strip or tile) before any pixel memory is allocated and may refuse them. Memory that libtiff
/// allocates for one strip or tile is bounded by `max_alloc` bytes.
pub fn decode_bgr(
    bytes: &[u8],
    max_alloc: u64,
    check: impl Fn(u64, u64) -> Result<(), String>,
) -> Result<(usize, usize, Vec<u8>), String> {
    let mut source = Source { bytes, pos: 0 };
    static QUIET: std::sync::Once = std::sync::Once::new();
    // SAFETY: silencing libtiff's default handlers (which print to stderr), once per process.
    QUIET.call_once(|| unsafe {
        TIFFSetErrorHandler(std::ptr::null());
        TIFFSetWarningHandler(std::ptr::null());
    });
    // SAFETY: `source` outlives the handle (declared before it); the options object is freed
    // right after the open that copies it.
    let tif = unsafe {
        let opts = TIFFOpenOptionsAlloc();
        if !opts.is_null() {
            TIFFOpenOptionsSetMaxSingleMemAlloc(opts, max_alloc.min(isize::MAX as u64) as isize);
        }
        let tif = TIFFClientOpenExt(
            c"image".as_ptr(),
            c"r".as_ptr(),
            &mut source as *mut Source as *mut c_void,
            read,
            write,
            seek,
            close,
            size,
            map,
            unmap,
            opts,
        );
        if !opts.is_null() {
            TIFFOpenOptionsFree(opts);
        }
        tif
    };
    if tif.is_null() {
        return Err("bad TIFF header".into());
    }
    let tif = Handle(tif);
    let layout = Layout::read(&tif, &check)?;
    let bgr = read_rgba(&tif, &layout)?;
    Ok(orient(&layout, bgr))
}

/// What OpenCV reads from the header before the pixels.
struct Layout {
    width: usize,
    height: usize,
    tiled: bool,
    tile_w: usize,
    tile_h: usize,
    orientation: u16,
}

impl Layout {
    /// OpenCV's `readHeader` checks (sample sizes and formats it accepts) and libtiff's own
    /// (`TIFFRGBAImageOK`: a float TIFF, for one, is refused as `cv2.imread` refuses it).
    fn read(tif: &Handle, check: &impl Fn(u64, u64) -> Result<(), String>) -> Result<Self, String> {
        let (Some(width), Some(height), Some(photometric)) = (
            tif.u32(TAG_IMAGEWIDTH),
            tif.u32(TAG_IMAGELENGTH),
            tif.u16(TAG_PHOTOMETRIC),
        ) else {
            return Err("TIFF without width, height or photometric tag".into());
        };
        check(width as u64, height as u64)?;
        let grey = photometric == PHOTOMETRIC_MINISWHITE || photometric == PHOTOMETRIC_MINISBLACK;
        let mut bps = tif.u16(TAG_BITSPERSAMPLE).unwrap_or(1);
        let spp = tif
            .u16(TAG_SAMPLESPERPIXEL)
            .unwrap_or(if grey { 1 } else { 3 });
        if !(1..=4).contains(&spp) {
            return Err(format!("{spp} samples a pixel (1 to 4 are read)"));
        }
        if bps > 8 && (photometric > 2 || spp == 2) {
            bps = 8;
        }
        let format = tif.u16(TAG_SAMPLEFORMAT).unwrap_or(SAMPLEFORMAT_UINT);
        let integer = format == SAMPLEFORMAT_UINT || format == SAMPLEFORMAT_INT;
        let accepted = match bps {
            1 | 8 | 10 | 12 | 14 | 16 => integer,
            4 => integer && photometric == PHOTOMETRIC_PALETTE,
            32 => format == SAMPLEFORMAT_IEEEFP || format == SAMPLEFORMAT_INT,
            64 => format == SAMPLEFORMAT_IEEEFP,
            _ => false,
        };
        if !accepted {
            return Err(format!(
                "{bps}-bit samples of format {format} (photometric {photometric}) are not read"
            ));
        }
        let mut msg = [0 as c_char; 1024];
        // SAFETY: libtiff writes at most 1024 bytes, NUL-terminated, into `msg`.
        if unsafe { TIFFRGBAImageOK(tif.0, msg.as_mut_ptr()) } == 0 {
            let text = unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) };
            return Err(text.to_string_lossy().into_owned());
        }
        // SAFETY: plain query on an open handle.
        let tiled = unsafe { TIFFIsTiled(tif.0) } != 0;
        let (mut tile_w, mut tile_h) = if tiled {
            match (tif.u32(TAG_TILEWIDTH), tif.u32(TAG_TILELENGTH)) {
                (Some(w), Some(h)) => (w, h),
                _ => return Err("tiled TIFF without tile size".into()),
            }
        } else {
            (width, tif.u32(TAG_ROWSPERSTRIP).unwrap_or(0))
        };
        if tile_w == 0 {
            tile_w = width;
        }
        if tile_h == 0 || (!tiled && tile_h == u32::MAX) {
            tile_h = height;
        }
        if !tiled {
            // One strip buffer of `tile_h` rows; rows past the image are never filled.
            tile_h = tile_h.min(height);
        }
        if tile_w > 1 << 24 || tile_h > 1 << 24 {
            return Err(format!("{tile_w}x{tile_h} tiles are too large"));
        }
        check(tile_w as u64, tile_h as u64).map_err(|e| format!("a tile or strip of {e}"))?;
        Ok(Layout {
            width: width as usize,
            height: height as usize,
            tiled,
            tile_w: tile_w as usize,
            tile_h: tile_h as usize,
            orientation: tif.u16(TAG_ORIENTATION).unwrap_or(1),
        })
    }
}

/// OpenCV's 8-bit loop: each strip or tile through libtiff's RGBA reader (whose raster has its
/// rows bottom-up), each row's R, G, B placed in BGR order; orientations 3, 4, 7 and 8 place the
/// strips from the bottom of the image.
fn read_rgba(tif: &Handle, l: &Layout) -> Result<Vec<u8>, String> {
    let vert_flip = matches!(l.orientation, 3 | 4 | 7 | 8);
    let mut raster = vec![0u32; l.tile_w * l.tile_h];
    let mut out = vec![0u8; l.width * l.height * 3];
    for y in (0..l.height).step_by(l.tile_h) {
        let tile_height = l.tile_h.min(l.height - y);
        let img_y = if vert_flip {
            l.height - y - tile_height
        } else {
            y
        };
        for x in (0..l.width).step_by(l.tile_w) {
            let tile_width = l.tile_w.min(l.width - x);
            // SAFETY: the raster holds tile_w * tile_h pixels, the size libtiff fills for one
            // strip (rows per strip clamped to the height) or one tile.
            let ok = unsafe {
                if l.tiled {
                    TIFFReadRGBATile(tif.0, x as u32, y as u32, raster.as_mut_ptr())
                } else {
                    TIFFReadRGBAStrip(tif.0, y as u32, raster.as_mut_ptr())
                }
            };
            if ok == 0 {
                return Err(format!("cannot read the TIFF pixels at row {y}"));
            }
            // A partial tile's rows sit at the bottom of the tile raster.
            let start = if l.tiled {
                (l.tile_h - tile_height) * l.tile_w
            } else {
                0
            };
            for i in 0..tile_height {
                let src = &raster[start + i * l.tile_w..][..tile_width];
                let row = img_y + tile_height - i - 1;
                let dst = &mut out[(row * l.width + x) * 3..][..tile_width * 3];
                for (px, abgr) in dst.chunks_exact_mut(3).zip(src) {
                    let [r, g, b, _a] = abgr.to_le_bytes();
                    px.copy_from_slice(&[b, g, r]);
                }
            }
        }
    }
    Ok(out)
}

/// OpenCV's `fixOrientationPartial` (libtiff's reader has already done the flips): orientations
/// 6 and 8 are turned by 180 degrees, then 5 to 8 are transposed.
fn orient(l: &Layout, data: Vec<u8>) -> (usize, usize, Vec<u8>) {
    let (w, h) = (l.width, l.height);
    let (turn, transpose) = match l.orientation {
        6 | 8 => (true, true),
        5 | 7 => (false, true),
        _ => (false, false),
    };
    if !transpose {
        return (w, h, data);
    }
    let mut out = vec![0u8; data.len()];
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = if turn { (w - 1 - x, h - 1 - y) } else { (x, y) };
            // Transposed: the output is h wide, pixel (x, y) of the source goes to (y, x).
            let to = (x * h + y) * 3;
            let from = (sy * w + sx) * 3;
            out[to..to + 3].copy_from_slice(&data[from..from + 3]);
        }
    }
    (h, w, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_recognised() {
        assert!(is_tiff(b"II*\0rest"));
        assert!(is_tiff(b"MM\0*rest"));
        assert!(is_tiff(b"II+\0rest"));
        assert!(!is_tiff(b"II*"));
        assert!(!is_tiff(b"\x89PNG"));
    }

    #[test]
    fn transposing_orientations_match_opencv() {
        // 2x1 source "AB": 5 (transpose) gives A over B; 6 and 8 (turned, then transposed) give
        // B over A.
        let data = vec![1, 1, 1, 2, 2, 2];
        let layout = |o| Layout {
            width: 2,
            height: 1,
            tiled: false,
            tile_w: 2,
            tile_h: 1,
            orientation: o,
        };
        assert_eq!(orient(&layout(5), data.clone()), (1, 2, data.clone()));
        assert_eq!(
            orient(&layout(6), data.clone()),
            (1, 2, vec![2, 2, 2, 1, 1, 1])
        );
        assert_eq!(orient(&layout(1), data.clone()), (2, 1, data));
    }

    #[test]
    fn truncated_or_garbage_tiffs_are_errors() {
        assert!(decode_bgr(b"II*\0", 1 << 20, |_, _| Ok(())).is_err());
        assert!(decode_bgr(b"II*\0\x08\0\0\0\xff\xff", 1 << 20, |_, _| Ok(())).is_err());
    }
}
