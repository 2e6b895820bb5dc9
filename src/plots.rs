//! PNG pictures: training curves (`results.png`), precision-recall curves (`pr_curves.png`) and
//! label co-occurrence (`confusion.png`). Drawn with plotters into memory, then written atomically.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::fsutil::write_atomic_with;

const FONT: &str = "sans-serif";
static REGISTER_FONT: Once = Once::new();

fn register_font() {
    REGISTER_FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, bytes);
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, bytes);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Renders `(w, h)` RGB pixels with `draw` and writes them as a PNG.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(root.clone())?;
        root.present().map_err(err)?;
    }
    write_atomic_with(path, |f| {
        let encoder = image::codecs::png::PngEncoder::new(std::io::BufWriter::new(f));
        image::ImageEncoder::write_image(encoder, &buf, w, h, image::ExtendedColorType::Rgb8)?;
        Ok(())
    })
}

/// A palette of distinguishable colours for up to ~20 series.
pub fn colour(i: usize) -> RGBColor {
    const C: [(u8, u8, u8); 12] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (0, 0, 0),
        (255, 215, 0),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// One line of a chart: name and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

fn line_chart(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = y_range.unwrap_or_else(|| {
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        (y0 - pad, y1 + pad)
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied().filter(|(_, y)| y.is_finite()),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// `results.png`: losses, micro/macro F1 and per-label F1 over epochs.
pub fn training_curves(
    path: &Path,
    losses: &[Series],
    f1: &[Series],
    per_label: &[Series],
) -> Result<()> {
    render(path, (1800, 560), |root| {
        let areas = root.split_evenly((1, 3));
        line_chart(
            &areas[0],
            "Loss",
            "epoch",
            "binary cross-entropy",
            losses,
            None,
        )?;
        line_chart(
            &areas[1],
            "Validation F1 (threshold 0.5)",
            "epoch",
            "F1",
            f1,
            Some((0.0, 1.02)),
        )?;
        line_chart(
            &areas[2],
            "Validation F1 per label",
            "epoch",
            "F1",
            per_label,
            Some((0.0, 1.02)),
        )
    })
}

/// `pr_curves.png`: one precision-recall curve per label (AP in the legend).
pub fn pr_curves(path: &Path, curves: &[Series]) -> Result<()> {
    render(path, (1000, 800), |root| {
        line_chart(
            &root,
            "Precision-recall per label",
            "recall",
            "precision",
            curves,
            Some((0.0, 1.02)),
        )
    })
}

/// Where `confusion.png` puts its cells: the left and top margins and the side of a cell, in
/// pixels.
#[derive(Clone, Copy)]
struct Grid {
    left: i32,
    top: i32,
    cell: i32,
}

/// `confusion.png`: `counts[t][p]` = images with true label `t` that were predicted label `p`,
/// as a heat map with the count in each cell.
pub fn confusion(
    path: &Path,
    labels: &[String],
    counts: &[Vec<u64>],
    threshold_note: &str,
) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let n = labels.len().max(1) as i32;
    let g = Grid {
        left: 200,
        top: 70,
        cell: 64,
    };
    let (w, h) = (
        (g.left + n * g.cell + 40) as u32,
        (g.top + n * g.cell + 200) as u32,
    );
    render(path, (w, h), |root| {
        let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
        let title = (FONT, 22)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(
            format!("True label (rows) vs predicted label (columns), {threshold_note}"),
            ((w / 2) as i32, 15),
            title,
        ))
        .map_err(err)?;
        confusion_rows(&root, g, labels, counts, max)?;
        let down = (FONT, 15)
            .into_font()
            .transform(FontTransform::Rotate90)
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (p, label) in labels.iter().enumerate() {
            let x = g.left + p as i32 * g.cell + g.cell / 2;
            root.draw(&Text::new(
                label.clone(),
                (x, g.top + n * g.cell + 8),
                down.clone(),
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}

/// The rows of `confusion.png`: per true label its name, then a cell per predicted label shaded
/// by its count over `max`, with the count in it.
fn confusion_rows(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    g: Grid,
    labels: &[String],
    counts: &[Vec<u64>],
    max: f64,
) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let cell = g.cell;
    let centred = (FONT, 15)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let right = (FONT, 15)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (t, row) in counts.iter().enumerate() {
        let y = g.top + t as i32 * cell;
        root.draw(&Text::new(
            labels[t].clone(),
            (g.left - 8, y + cell / 2),
            right.clone(),
        ))
        .map_err(err)?;
        for (p, &c) in row.iter().enumerate() {
            let x = g.left + p as i32 * cell;
            let v = c as f64 / max;
            let fill = RGBColor(
                (255.0 * (1.0 - 0.8 * v)) as u8,
                (255.0 * (1.0 - 0.55 * v)) as u8,
                255,
            );
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                fill.filled(),
            ))
            .map_err(err)?;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell, y + cell)],
                BLACK.mix(0.2),
            ))
            .map_err(err)?;
            let text = if v > 0.6 {
                centred.clone().color(&WHITE)
            } else {
                centred.clone()
            };
            root.draw(&Text::new(
                c.to_string(),
                (x + cell / 2, y + cell / 2),
                text,
            ))
            .map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_non_blank_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pr.png");
        let curves = vec![(
            "a (AP 0.80)".to_string(),
            vec![(0.0, 1.0), (0.5, 0.8), (1.0, 0.5)],
        )];
        pr_curves(&path, &curves).unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (1000, 800));
        let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(non_white > 5000, "{non_white} drawn pixels");
    }
}
