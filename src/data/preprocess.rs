//! Inference preprocessing, described once: the model's input is the uint8 image as
//! `cv2.resize(cv2.imread(path), (size, size))` gives it (BGR, `[N, H, W, 3]`), and the network
//! sees it as float NCHW divided by 255. [`to_input`] does it on tensors (inference, validation
//! and, before the augmentations, training); the ONNX and TorchScript exporters build the same
//! steps into their graphs from the constants here and write [`description`] beside them; a
//! checkpoint records it as `model::checkpoint::Preprocessing::original`.

use serde_json::{Map, Value};
use tch::{Kind, Tensor};

/// Channel order of the input bytes: as `cv2.imread` returns them.
pub const CHANNEL_ORDER: &str = "BGR";
/// How a decoded image is brought to the input size (`data::resize`).
pub const RESIZE: &str = "opencv_inter_linear";
/// The OpenCV call [`RESIZE`] reproduces.
pub const RESIZE_CALL: &str = "cv2.resize(img, (size, size))";
/// Pixel values are divided by this.
pub const DIVISOR: f64 = 255.0;
/// The input's layout, and the permutation of its axes that gives the network's NCHW.
pub const INPUT_LAYOUT: &str = "[N, H, W, 3]";
pub const NHWC_TO_NCHW: [i64; 4] = [0, 3, 1, 2];

/// uint8 NHWC -> float NCHW in [0, 1].
pub fn to_input(pixels: &Tensor) -> Tensor {
    pixels.permute(NHWC_TO_NCHW).to_kind(Kind::Float) / DIVISOR
}

/// The scale as exported models state it ("1/255, inside the model").
pub fn scale_text() -> String {
    format!("1/{DIVISOR}, inside the model")
}

/// The preprocessing as JSON fields for an exported model's metadata: image size, channel
/// order, resize and scale, in that order.
pub fn description(image_size: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("image_size".into(), image_size.into());
    m.insert("channel_order".into(), CHANNEL_ORDER.into());
    m.insert("resize".into(), RESIZE.into());
    m.insert("scale".into(), scale_text().into());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_input_divides_by_255_and_moves_channels_first() {
        let px = Tensor::from_slice(&[0u8, 51, 255, 102, 204, 153]).view([1, 1, 2, 3]);
        let x = to_input(&px);
        assert_eq!(x.size(), [1, 3, 1, 2]);
        assert_eq!(x.kind(), Kind::Float);
        let got = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        let want = [0.0f32, 102.0, 51.0, 204.0, 255.0, 153.0].map(|v| v / 255.0);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-7, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn the_description_states_the_constants() {
        let d = Value::Object(description(224)).to_string();
        assert_eq!(
            d,
            r#"{"image_size":224,"channel_order":"BGR","resize":"opencv_inter_linear","scale":"1/255, inside the model"}"#
        );
    }
}
