//! The original's training augmentations (albumentations, in order) as batched tensor operations
//! on the training device. Random parameters are drawn per image from a seeded generator on the
//! host, so a run is the same on CPU and GPU and after a resume.
//!
//! The list: ToGray p=0.5; HorizontalFlip p=0.5; VerticalFlip p=0.2; RandomGamma (0.8-1.2) p=0.5;
//! RandomBrightness ±0.2 p=0.5; HueSaturationValue (hue ±5, sat ±20, val ±10) p=0.5;
//! ShiftScaleRotate (shift 0.0625, scale 0.1, rotate ±90°, reflect-101 border) p=0.5;
//! RandomResizedCrop scale (0.9, 1.1) ratio (3/4, 4/3) p=1. Like albumentations on an image read by
//! OpenCV, the colour operations treat channel 0 as red.

use rand::{Rng, RngCore};
use tch::{Kind, Tensor};

use super::preprocess::to_input;

/// Which augmentations `fit` applies to training batches.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// The original list (see the module documentation).
    Original,
    /// None: training images are fed as validation images are.
    None,
}

/// Draws a `RandomResizedCrop` box as albumentations does: up to 10 tries of an area in
/// `scale` × image area and a log-uniform aspect ratio, else the whole image. Returns
/// (x0, y0, w, h) in pixels.
fn crop_box(rng: &mut impl RngCore, size: usize) -> (f64, f64, f64, f64) {
    let area = (size * size) as f64;
    for _ in 0..10 {
        let target = area * rng.gen_range(0.9..1.1);
        let ratio = rng
            .gen_range((3.0f64 / 4.0).ln()..(4.0f64 / 3.0).ln())
            .exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w > 0.0 && h > 0.0 && w <= size as f64 && h <= size as f64 {
            let x0 = rng.gen_range(0..=(size - w as usize)) as f64;
            let y0 = rng.gen_range(0..=(size - h as usize)) as f64;
            return (x0, y0, w, h);
        }
    }
    (0.0, 0.0, size as f64, size as f64)
}

/// RGB (channel 0 = red) in [0, 1] -> HSV with H in [0, 1), S and V in [0, 1].
fn rgb_to_hsv(x: &Tensor) -> (Tensor, Tensor, Tensor) {
    let r = x.select(1, 0);
    let g = x.select(1, 1);
    let b = x.select(1, 2);
    let max = r.maximum(&g).maximum(&b);
    let min = r.minimum(&g).minimum(&b);
    let delta = &max - &min;
    let safe = delta.clamp_min(1e-12);
    let hr = ((&g - &b) / &safe).remainder(6.0);
    let hg = (&b - &r) / &safe + 2.0;
    let hb = (&r - &g) / &safe + 4.0;
    let h = hr.where_self(&max.eq_tensor(&r), &hg.where_self(&max.eq_tensor(&g), &hb));
    let h = (delta.gt(0.0).to_kind(Kind::Float) * h / 6.0).remainder(1.0);
    let s = (&delta / max.clamp_min(1e-12)).where_self(&max.gt(0.0), &max.zeros_like());
    (h, s, max)
}

fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Tensor {
    let channel = |n: f64| {
        let k = (h * 6.0 + n).remainder(6.0);
        let f = k.minimum(&(4.0 - &k)).clamp(0.0, 1.0);
        v - v * s * f
    };
    Tensor::stack(&[channel(5.0), channel(3.0), channel(1.0)], 1)
}

/// Random parameters per image, drawn on the host: 0/1 gray, h-flip, v-flip; gamma; brightness
/// shift; 0/1 HSV and its hue, saturation, value shifts; the 2x3 sampling matrix of
/// shift-scale-rotate composed with the random resized crop.
pub const PARAMS: usize = 15;

/// Draws the parameters of `n` images (row-major `n x PARAMS`) for images of `size` pixels.
/// A whole epoch's parameters are drawn at once and copied to the device in one transfer, so no
/// training step waits on the host.
pub fn draw_params(rng: &mut impl RngCore, n: usize, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * PARAMS);
    for _ in 0..n {
        let flag = |rng: &mut dyn RngCore, p: f64| if rng.gen_bool(p) { 1.0f32 } else { 0.0 };
        let gray = flag(rng, 0.5);
        let hflip = flag(rng, 0.5);
        let vflip = flag(rng, 0.2);
        let gamma = if rng.gen_bool(0.5) {
            rng.gen_range(0.8..1.2f32)
        } else {
            1.0
        };
        let beta = if rng.gen_bool(0.5) {
            rng.gen_range(-0.2..0.2f32)
        } else {
            0.0
        };
        let hsv = flag(rng, 0.5);
        let dh = rng.gen_range(-5.0..5.0f32) / 180.0;
        let ds = rng.gen_range(-20.0..20.0f32) / 255.0;
        let dv = rng.gen_range(-10.0..10.0f32) / 255.0;
        out.extend_from_slice(&[gray, hflip, vflip, gamma, beta, hsv, dh, ds, dv]);
        out.extend_from_slice(&sampling_matrix(rng, size));
    }
    out
}

/// ShiftScaleRotate (p=0.5) then RandomResizedCrop (p=1) as one `affine_grid` matrix.
fn sampling_matrix(rng: &mut impl RngCore, s: usize) -> [f32; 6] {
    let on = rng.gen_bool(0.5);
    let dx = rng.gen_range(-0.0625..0.0625f64);
    let dy = rng.gen_range(-0.0625..0.0625f64);
    let scale = rng.gen_range(0.9..1.1f64);
    let angle = rng.gen_range(-90.0..90.0f64).to_radians();
    let (dx, dy, scale, angle) = if on {
        (dx, dy, scale, angle)
    } else {
        (0.0, 0.0, 1.0, 0.0)
    };
    let (x0, y0, w, h) = crop_box(rng, s);
    // Crop: output u in [-1, 1] -> point c + u * half in the SSR output (normalised coordinates).
    let sf = s as f64;
    let (cx, cy) = (
        (x0 + w / 2.0) / sf * 2.0 - 1.0,
        (y0 + h / 2.0) / sf * 2.0 - 1.0,
    );
    let (hx, hy) = (w / sf, h / sf);
    // SSR maps source p to scale * R(angle) p + t; its inverse is p = R(-angle) (q - t) / scale.
    let (tx, ty) = (2.0 * dx, 2.0 * dy);
    let (cos, sin) = (angle.cos() / scale, angle.sin() / scale);
    let (qx, qy) = (cx - tx, cy - ty);
    [
        (cos * hx) as f32,
        (-sin * hy) as f32,
        (cos * qx - sin * qy) as f32,
        (sin * hx) as f32,
        (cos * hy) as f32,
        (sin * qx + cos * qy) as f32,
    ]
}

/// `f` applied to the images whose `on` flag is set, the others kept. `f` gets those images and
/// their parameter rows. On the CPU only the chosen images are computed; on a GPU everything is
/// computed and blended with `where`, which needs no host round trip.
fn masked(
    x: &Tensor,
    params: &Tensor,
    on: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
) -> Tensor {
    if x.device() == tch::Device::Cpu {
        let idx = on.nonzero().squeeze_dim(1);
        if idx.size()[0] == 0 {
            return x.shallow_clone();
        }
        return x.index_copy(
            0,
            &idx,
            &f(&x.index_select(0, &idx), &params.index_select(0, &idx)),
        );
    }
    f(x, params).where_self(&on.view([-1, 1, 1, 1]), x)
}

/// One training batch: uint8 NHWC on the device and its `n x PARAMS` parameters (same device)
/// -> augmented float NCHW in [0, 1] (the input as [`to_input`] makes it, augmented). Everything is batched tensor arithmetic.
pub fn apply(pixels: &Tensor, params: &Tensor) -> Tensor {
    let x = to_input(pixels);
    let size = pixels.size();
    let (n, s) = (size[0], size[1]);
    let flag = |i: i64| params.select(1, i).gt(0.5);
    let per_image = |p: &Tensor, i: i64| {
        let m = p.size()[0];
        p.select(1, i).view([m, 1, 1, 1])
    };
    // ToGray (albumentations' RGB weights applied to channels 0, 1, 2).
    let x = masked(&x, params, &flag(0), |x, _| {
        (x.select(1, 0) * 0.299 + x.select(1, 1) * 0.587 + x.select(1, 2) * 0.114)
            .unsqueeze(1)
            .expand([-1, 3, -1, -1], false)
    });
    // Flips.
    let x = masked(&x, params, &flag(1), |x, _| x.flip([3]));
    let x = masked(&x, params, &flag(2), |x, _| x.flip([2]));
    // RandomGamma (exponent 1 when off), RandomBrightness (shift 0 when off).
    let x = masked(&x, params, &params.select(1, 3).ne(1.0), |x, p| {
        x.clamp_min(0.0).pow(&per_image(p, 3))
    });
    let x = (x + per_image(params, 4)).clamp(0.0, 1.0);
    // HueSaturationValue in OpenCV 8-bit units (hue of 180, sat and val of 255).
    let x = masked(&x, params, &flag(5), |x, p| {
        let (h, sa, va) = rgb_to_hsv(x);
        let shift = |i: i64| per_image(p, i).squeeze_dim(1);
        let h = (h + shift(6)).remainder(1.0);
        let sa = (sa + shift(7)).clamp(0.0, 1.0);
        let va = (va + shift(8)).clamp(0.0, 1.0);
        hsv_to_rgb(&h, &sa, &va)
    });
    // Shift-scale-rotate + random resized crop in one bilinear resampling with reflect-101 border.
    let theta = params.narrow(1, 9, 6).view([n, 2, 3]).to_kind(x.kind());
    let grid = Tensor::affine_grid_generator(&theta, [n, 3, s, s], true);
    Tensor::grid_sampler(&x, &grid, 0, 2, true).clamp(0.0, 1.0)
}

/// One training batch with parameters drawn from `rng` (see [`draw_params`] and [`apply`]).
pub fn augment(pixels: &Tensor, mode: Augment, rng: &mut impl RngCore) -> Tensor {
    if mode == Augment::None {
        return to_input(pixels);
    }
    let size = pixels.size();
    let (n, s) = (size[0] as usize, size[1] as usize);
    let params = Tensor::from_slice(&draw_params(rng, n, s))
        .view([n as i64, PARAMS as i64])
        .to_device(pixels.device());
    apply(pixels, &params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::Device;

    fn batch() -> Tensor {
        Tensor::randint(256, [6, 32, 32, 3], (Kind::Uint8, Device::Cpu))
    }

    #[test]
    fn none_is_plain_scaling() {
        let px = batch();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = augment(&px, Augment::None, &mut rng);
        assert!(out.allclose(&to_input(&px), 0.0, 0.0, false));
    }

    #[test]
    fn original_is_seeded_in_range_and_changes_images() {
        tch::manual_seed(0);
        let px = batch();
        let run = |seed| {
            augment(
                &px,
                Augment::Original,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )
        };
        let (a, b, c) = (run(5), run(5), run(6));
        assert_eq!(a.size(), [6, 3, 32, 32]);
        assert!(a.equal(&b), "same seed, same batch");
        assert!(!a.equal(&c), "another seed, another batch");
        assert!(a.min().double_value(&[]) >= 0.0 && a.max().double_value(&[]) <= 1.0);
        assert!(
            (a - to_input(&px))
                .abs()
                .mean(Kind::Float)
                .double_value(&[])
                > 0.01
        );
    }

    #[test]
    fn hsv_round_trip_is_identity() {
        let x = Tensor::rand([4, 3, 8, 8], (Kind::Float, Device::Cpu));
        let (h, s, v) = rgb_to_hsv(&x);
        let back = hsv_to_rgb(&h, &s, &v);
        assert!(back.allclose(&x, 1e-5, 1e-5, false));
    }

    #[test]
    fn identity_crop_and_no_rotation_keeps_the_image() {
        // theta for the whole image and no SSR is the identity.
        let x = Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let theta = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0]).view([1, 2, 3]);
        let grid = Tensor::affine_grid_generator(&theta, [1, 3, 16, 16], true);
        let y = Tensor::grid_sampler(&x, &grid, 0, 2, true);
        assert!(y.allclose(&x, 1e-5, 1e-5, false));
    }
}
