//! OpenCV's `cv::resize(..., INTER_LINEAR)` for 8-bit images, bit for bit.
//!
//! OpenCV computes bilinear weights in `f32`, turns them into 11-bit fixed-point coefficients,
//! interpolates each row horizontally into `i32` and then blends two rows with the rounding of its
//! `VResizeLinear<uchar, int, short>` specialisation. The Keras original fed `cv2.resize` output to
//! the network, so an off-by-one here moves the probabilities by about 1e-3.

const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// Per-destination-coordinate source index and fixed-point weights along one axis.
struct Axis {
    src: Vec<usize>,
    weights: Vec<[i32; 2]>,
}

/// `saturate_cast<short>(float)`: round half to even, then clamp.
fn round_to_short(v: f32) -> i32 {
    v.round_ties_even().clamp(i16::MIN as f32, i16::MAX as f32) as i32
}

/// Source columns and weights as `resizeGeneric_` builds them (`xofs`/`ialpha`): a position left
/// of the first or right of the last column is clamped to it with weights (1, 0).
fn x_axis(src_len: usize, dst_len: usize) -> Axis {
    let scale = 1.0 / (dst_len as f64 / src_len as f64);
    let mut src = Vec::with_capacity(dst_len);
    let mut weights = Vec::with_capacity(dst_len);
    for d in 0..dst_len {
        let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
        let mut s = f.floor() as i64;
        f -= s as f32;
        if s < 0 {
            f = 0.0;
            s = 0;
        }
        if s >= src_len as i64 - 1 {
            f = 0.0;
            s = src_len as i64 - 1;
        }
        src.push(s as usize);
        weights.push([
            round_to_short((1.0 - f) * COEF_SCALE),
            round_to_short(f * COEF_SCALE),
        ]);
    }
    Axis { src, weights }
}

/// Resizes an interleaved 8-bit image of `channels` channels from `(src_w, src_h)` to
/// `(dst_w, dst_h)` like `cv2.resize(img, (dst_w, dst_h))` with the default INTER_LINEAR.
pub fn resize_linear(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
) -> Vec<u8> {
    assert_eq!(src.len(), src_w * src_h * channels, "source buffer size");
    assert!(
        src_w > 0 && src_h > 0 && dst_w > 0 && dst_h > 0,
        "empty image"
    );
    if src_w == dst_w && src_h == dst_h {
        return src.to_vec();
    }
    // OpenCV switches INTER_LINEAR to its fast INTER_AREA path for an exact halving.
    if src_w == dst_w * 2 && src_h == dst_h * 2 {
        return halve(src, src_w, channels, dst_w, dst_h);
    }
    let xs = x_axis(src_w, dst_w);
    let ys = y_axis(src_h, dst_h);
    let row_len = dst_w * channels;
    let hresize = |y: usize, out: &mut Vec<i32>| {
        out.clear();
        let row = &src[y * src_w * channels..(y + 1) * src_w * channels];
        for (sx, w) in xs.src.iter().zip(&xs.weights) {
            let sx2 = (sx + 1).min(src_w - 1);
            for c in 0..channels {
                let a = row[sx * channels + c] as i32;
                let b = row[sx2 * channels + c] as i32;
                out.push(a * w[0] + b * w[1]);
            }
        }
    };
    let mut dst = vec![0u8; dst_h * row_len];
    let (mut r0, mut r1) = (Vec::with_capacity(row_len), Vec::with_capacity(row_len));
    let mut cached: [Option<usize>; 2] = [None, None];
    for (dy, ((y0, y1), beta)) in ys.iter().enumerate() {
        if cached[0] != Some(*y0) {
            if cached[1] == Some(*y0) {
                std::mem::swap(&mut r0, &mut r1);
                cached[0] = cached[1];
                cached[1] = None;
            } else {
                hresize(*y0, &mut r0);
                cached[0] = Some(*y0);
            }
        }
        if cached[1] != Some(*y1) {
            hresize(*y1, &mut r1);
            cached[1] = Some(*y1);
        }
        let (b0, b1) = (beta[0], beta[1]);
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        for ((o, s0), s1) in out.iter_mut().zip(&r0).zip(&r1) {
            let v = (((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16) + 2) >> 2;
            *o = v.clamp(0, 255) as u8;
        }
    }
    dst
}

/// Rows `(clip(sy), clip(sy + 1))` and their weights for each destination row: along y OpenCV
/// clamps the row index but keeps the weight.
fn y_axis(src_h: usize, dst_h: usize) -> Vec<((usize, usize), [i32; 2])> {
    let scale = 1.0 / (dst_h as f64 / src_h as f64);
    let clip = |v: i64| v.clamp(0, src_h as i64 - 1) as usize;
    (0..dst_h)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor() as i64;
            f -= s as f32;
            let w = [
                round_to_short((1.0 - f) * COEF_SCALE),
                round_to_short(f * COEF_SCALE),
            ];
            ((clip(s), clip(s + 1)), w)
        })
        .collect()
}

/// `resizeAreaFast_` for a scale of exactly 1/2: the rounded mean of each 2x2 block.
fn halve(src: &[u8], src_w: usize, channels: usize, dst_w: usize, dst_h: usize) -> Vec<u8> {
    let mut dst = Vec::with_capacity(dst_w * dst_h * channels);
    let at = |x: usize, y: usize, c: usize| src[(y * src_w + x) * channels + c] as u32;
    for y in 0..dst_h {
        for x in 0..dst_w {
            for c in 0..channels {
                let s = at(2 * x, 2 * y, c)
                    + at(2 * x + 1, 2 * y, c)
                    + at(2 * x, 2 * y + 1, c)
                    + at(2 * x + 1, 2 * y + 1, c);
                dst.push(((s + 2) >> 2) as u8);
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_linear(&src, 5, 4, 3, 5, 4), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![173u8; 37 * 29 * 3];
        let out = resize_linear(&src, 37, 29, 3, 224, 224);
        assert!(out.iter().all(|&v| v == 173));
        let out = resize_linear(&src, 37, 29, 3, 11, 7);
        assert!(out.iter().all(|&v| v == 173));
    }

    #[test]
    fn exact_halving_averages_blocks() {
        // 4x2 single-channel image -> 2x1: means of the two 2x2 blocks, rounded half up.
        let src = [0u8, 1, 10, 20, 2, 3, 30, 41];
        assert_eq!(resize_linear(&src, 4, 2, 1, 2, 1), vec![2, 25]);
    }

    #[test]
    fn upscale_two_pixels_matches_opencv() {
        // cv2.resize(np.array([[0, 255]], np.uint8), (4, 1)) == [[0, 64, 191, 255]]
        let out = resize_linear(&[0, 255], 2, 1, 1, 4, 1);
        assert_eq!(out, vec![0, 64, 191, 255]);
    }
}
