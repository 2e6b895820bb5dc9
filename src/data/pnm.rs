//! PBM, PGM and PPM (`P1`–`P6`, ASCII and binary, 8 and 16 bit) read as OpenCV's own
//! `PxMDecoder` reads them into 8-bit BGR:
//! - ASCII samples are clamped to the maximum value; 8-bit ones are then scaled to 0–255
//!   (`v * 255 / maxval`, rounded down), binary 8-bit samples are taken as they are;
//! - 16-bit samples (maximum value above 255) keep their high byte, ASCII or binary;
//! - a PBM bit 1 is black (0), 0 is white (255).

/// True for OpenCV's PxM signature: `P`, a digit 1 to 6, then white space.
pub fn is_pnm(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[0] == b'P' && (b'1'..=b'6').contains(&bytes[1]) && is_space(bytes[2])
}

/// C's `isspace`, which OpenCV's reader uses (it includes vertical tab).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// The header and the samples that follow it.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.pos).ok_or("file cut short")?;
        self.pos += 1;
        Ok(b)
    }

    /// OpenCV's `ReadNumber`: skips white space and `#` comments (to the end of the line), then
    /// reads decimal digits (at most `max_digits` when non-zero) and the byte after them.
    fn number(&mut self, max_digits: usize) -> Result<u32, String> {
        let mut c = self.byte()?;
        while !c.is_ascii_digit() {
            if c == b'#' {
                while c != b'\n' && c != b'\r' {
                    c = self.byte()?;
                }
                c = self.byte()?;
            } else if is_space(c) {
                c = self.byte()?;
            } else {
                return Err(format!(
                    "unexpected byte 0x{c:02x} in the header or samples"
                ));
            }
        }
        let mut value: u64 = 0;
        let mut digits = 0;
        loop {
            value = value * 10 + u64::from(c - b'0');
            if value > i32::MAX as u64 {
                return Err("number too large".into());
            }
            digits += 1;
            if max_digits != 0 && digits >= max_digits {
                break;
            }
            // The last number of an ASCII file may end the file.
            match self.bytes.get(self.pos) {
                Some(&next) => {
                    self.pos += 1;
                    if !next.is_ascii_digit() {
                        break;
                    }
                    c = next;
                }
                None => break,
            }
        }
        Ok(value as u32)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).ok_or("file cut short")?;
        let s = self.bytes.get(self.pos..end).ok_or("file cut short")?;
        self.pos = end;
        Ok(s)
    }
}

/// Decodes a PBM/PGM/PPM image into BGR. `check` sees the header's width and height before any
/// pixel memory is allocated and may refuse them.
pub fn decode_bgr(
    bytes: &[u8],
    check: impl Fn(u64, u64) -> Result<(), String>,
) -> Result<(usize, usize, Vec<u8>), String> {
    if !is_pnm(bytes) {
        return Err("not a PBM, PGM or PPM file".into());
    }
    let kind = bytes[1];
    let mut r = Reader { bytes, pos: 2 };
    let width = r.number(0)? as usize;
    let height = r.number(0)? as usize;
    let bitmap = kind == b'1' || kind == b'4';
    let maxval = if bitmap { 1 } else { r.number(0)? };
    if width == 0 || height == 0 || maxval == 0 || maxval > 65535 {
        return Err(format!(
            "header says {width}x{height} pixels, maximum value {maxval}"
        ));
    }
    check(width as u64, height as u64)?;
    let channels = if kind == b'3' || kind == b'6' { 3 } else { 1 };
    let binary = kind >= b'4';
    let samples = if bitmap {
        bits(&mut r, width, height, binary)?
    } else {
        words(&mut r, width * channels, height, maxval, binary)?
    };
    let mut out = Vec::with_capacity(width * height * 3);
    if channels == 3 {
        for px in samples.chunks_exact(3) {
            out.extend([px[2], px[1], px[0]]);
        }
    } else {
        for &v in &samples {
            out.extend([v, v, v]);
        }
    }
    Ok((width, height, out))
}

/// PBM samples: one digit each (ASCII) or eight to a byte, rows padded to a byte (binary).
fn bits(r: &mut Reader, width: usize, height: usize, binary: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(width * height);
    for _ in 0..height {
        if binary {
            let row = r.take(width.div_ceil(8))?;
            out.extend((0..width).map(|x| (row[x / 8] >> (7 - x % 8)) & 1));
        } else {
            for _ in 0..width {
                out.push(u8::from(r.number(1)? != 0));
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|b| if b == 1 { 0 } else { 255 })
        .collect())
}

/// PGM/PPM samples, `per_row` a row, as 8-bit values.
fn words(
    r: &mut Reader,
    per_row: usize,
    height: usize,
    maxval: u32,
    binary: bool,
) -> Result<Vec<u8>, String> {
    let wide = maxval > 255;
    let mut out = Vec::with_capacity(per_row * height);
    for _ in 0..height {
        if binary && wide {
            let row = r.take(per_row * 2)?;
            out.extend(row.chunks_exact(2).map(|be| be[0]));
        } else if binary {
            out.extend_from_slice(r.take(per_row)?);
        } else {
            for _ in 0..per_row {
                let v = r.number(0)?.min(maxval);
                out.push(if wide {
                    (v >> 8) as u8
                } else {
                    (v * 255 / maxval) as u8
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: u64, _: u64) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn ascii_samples_are_clamped_and_scaled_binary_ones_are_not() {
        let (w, h, data) = decode_bgr(b"P2\n# note\n3 1\n15\n0 15 99\n", ok).unwrap();
        assert_eq!((w, h), (3, 1));
        assert_eq!(data, [0, 0, 0, 255, 255, 255, 255, 255, 255]);
        let (_, _, data) = decode_bgr(b"P5 2 1 15\n\x07\x30", ok).unwrap();
        assert_eq!(data, [7, 7, 7, 0x30, 0x30, 0x30]);
    }

    #[test]
    fn sixteen_bit_samples_keep_their_high_byte() {
        let (_, _, data) = decode_bgr(b"P6 1 1 65535\n\x12\x34\x56\x78\x9a\xbc", ok).unwrap();
        assert_eq!(data, [0x9a, 0x56, 0x12]);
        let (_, _, data) = decode_bgr(b"P2 1 1 1000 70000", ok).unwrap();
        assert_eq!(data, [3, 3, 3]); // clamped to 1000, then 1000 >> 8
    }

    #[test]
    fn bitmaps_are_black_for_one() {
        let (_, _, data) = decode_bgr(b"P1\n3 1\n101", ok).unwrap();
        assert_eq!(data, [0, 0, 0, 255, 255, 255, 0, 0, 0]);
        let (w, _, data) = decode_bgr(b"P4\n9 1\n\x80\x80", ok).unwrap();
        assert_eq!(w, 9);
        assert_eq!(&data[..6], [0, 0, 0, 255, 255, 255]);
        assert_eq!(&data[24..], [0, 0, 0]);
    }

    #[test]
    fn hostile_headers_and_truncation_are_errors() {
        assert!(decode_bgr(b"P6 4 4 255\n\x01\x02", ok)
            .unwrap_err()
            .contains("cut short"));
        assert!(decode_bgr(b"P2 2 1 255\n1", ok).is_err());
        assert!(decode_bgr(b"P5 0 4 255\n", ok).is_err());
        assert!(decode_bgr(b"P5 4 4 70000\n", ok).is_err());
        assert!(decode_bgr(b"P5 99999999999 4 255\n", ok).is_err());
        assert!(decode_bgr(b"P5 4 x 255\n", ok).is_err());
        let refuse = |w: u64, h: u64| Err(format!("{w}x{h} refused"));
        let err = decode_bgr(b"P5 60000 60000 255\n", refuse).unwrap_err();
        assert_eq!(err, "60000x60000 refused");
    }
}
