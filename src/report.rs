//! `eval --report`: one self-contained HTML page to look at a model's mistakes. Every picture is
//! inlined as a data URI (the plots as PNG, the images as small JPEG thumbnails), nothing is
//! fetched from anywhere, and the page reads without JavaScript (a few inline lines sort the
//! per-label table).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use base64::Engine;

use crate::data::decode::read_bgr;
use crate::eval::{Evaluation, Review};
use crate::fsutil::write_atomic;

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL: u32 = 160;

/// What the page is made of, besides the evaluation itself.
pub struct Page<'a> {
    pub labels: &'a [String],
    /// (child, parent) label pairs of the taxonomy.
    pub hierarchy: &'a [(usize, usize)],
    /// The dataset root, to show paths relative to it.
    pub data: &'a Path,
    /// Pictures to inline: title and PNG file.
    pub pictures: &'a [(&'a str, std::path::PathBuf)],
    /// Images shown per label and kind of mistake, and per hierarchy violation.
    pub per_label: usize,
}

/// `&`, `<`, `>` and `"` as HTML entities.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A JPEG thumbnail of an image file (longest side [`THUMBNAIL`], upright as the model saw it) as
/// a data URI.
pub fn thumbnail(path: &Path) -> Result<String, String> {
    let img = read_bgr(path).map_err(|e| e.to_string())?;
    let rgb: Vec<u8> = img
        .data
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let (w, h) = (img.width as u32, img.height as u32);
    let buf = image::RgbImage::from_raw(w, h, rgb).ok_or("inconsistent image size")?;
    let scale = (THUMBNAIL as f64 / w.max(h) as f64).min(1.0);
    let (tw, th) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    let small = image::imageops::thumbnail(&buf, tw, th);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(&small)
        .map_err(|e| e.to_string())?;
    Ok(data_uri("image/jpeg", &jpeg))
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}\
th{background:#eee;cursor:pointer}td:first-child,th:first-child{text-align:left}\
.grid{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0;width:170px;font-size:11px;overflow-wrap:anywhere}\
figure img{display:block;max-width:160px;max-height:160px;border:1px solid #999}\
.fp{color:#a00}.fn{color:#00a}.pictures{display:flex;flex-wrap:wrap;gap:1em}\
.pictures figure{width:48%;min-width:320px;font-size:14px}.pictures figure img{max-width:100%;max-height:none}";

const SORT_SCRIPT: &str = "document.querySelectorAll('table.sortable th').forEach((th,i)=>th.onclick=()=>{\
const t=th.closest('table'),rows=[...t.querySelectorAll('tr')].slice(1),k=r=>r.cells[i].dataset.v??r.cells[i].textContent;\
const num=rows.every(r=>!isNaN(parseFloat(k(r))));const d=th.dataset.d=th.dataset.d=='a'?'d':'a';\
rows.sort((a,b)=>(num?parseFloat(k(a))-parseFloat(k(b)):k(a).localeCompare(k(b)))*(d=='a'?1:-1));\
rows.forEach(r=>t.tBodies[0].appendChild(r))});";

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

/// Writes `report.html` (atomically). Returns the number of thumbnails on it.
pub fn write(path: &Path, ev: &Evaluation, page: &Page) -> Result<usize> {
    let mut thumbs = Thumbnails::default();
    let mut html = String::new();
    let rep = &ev.report;
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>trainer eval: {}</title>\
         <style>{STYLE}</style></head><body><h1>Evaluation of {}</h1><p>data: {}, {} images, loss {:.4}</p>",
        escape(&rep.weights),
        escape(&rep.weights),
        escape(&rep.data),
        rep.images,
        rep.loss
    );
    summary(&mut html, ev);
    label_table(&mut html, ev, page);
    html += "<h2>Pictures</h2><div class=\"pictures\">";
    for (title, png) in page.pictures {
        match std::fs::read(png) {
            Ok(bytes) => {
                let _ = write!(
                    html,
                    "<figure><img alt=\"{}\" src=\"{}\"><figcaption>{}</figcaption></figure>",
                    escape(title),
                    data_uri("image/png", &bytes),
                    escape(title)
                );
            }
            Err(e) => {
                let _ = write!(html, "<p>{}: {}</p>", escape(title), escape(&e.to_string()));
            }
        }
    }
    html += "</div>";
    violations(&mut html, ev, page, &mut thumbs);
    mistakes(&mut html, ev, page, &mut thumbs);
    let _ = writeln!(html, "<script>{SORT_SCRIPT}</script></body></html>");
    write_atomic(path, html.as_bytes())?;
    Ok(thumbs.shown)
}

fn summary(html: &mut String, ev: &Evaluation) {
    let rep = &ev.report;
    let _ = write!(
        html,
        "<h2>Summary</h2><table><tr><th>micro F1</th><th>macro F1</th><th>micro AP</th><th>macro AP</th></tr>\
         <tr><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        rep.micro_f1,
        fmt(rep.macro_f1),
        fmt(rep.micro_average_precision),
        fmt(rep.macro_average_precision)
    );
}

fn label_table(html: &mut String, ev: &Evaluation, page: &Page) {
    *html +=
        "<h2>Per label</h2><table class=\"sortable\"><thead><tr><th>label</th><th>threshold</th>\
              <th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>support</th><th>tp</th>\
              <th>fp</th><th>fn</th></tr></thead><tbody>";
    for l in &ev.report.labels {
        let _ = write!(
            html,
            "<tr><td><a href=\"#label-{}\">{}</a></td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&l.label),
            escape(&l.label),
            l.threshold,
            l.precision,
            l.recall,
            l.f1,
            fmt(l.average_precision),
            l.support,
            l.tp,
            l.fp,
            l.fn_
        );
    }
    let _ = write!(
        html,
        "</tbody></table><p>{} labels; click a column to sort.</p>",
        page.labels.len()
    );
}

/// Thumbnails made so far, by image index (an image wrong about several labels is decoded once).
#[derive(Default)]
struct Thumbnails {
    made: HashMap<usize, Result<String, String>>,
    shown: usize,
}

impl Thumbnails {
    /// One image as a figure: thumbnail, path, folder tag, true labels and predictions.
    fn figure(&mut self, ev: &Evaluation, page: &Page, image: usize, note: &str) -> String {
        let sample = &ev.samples[image];
        let uri = self
            .made
            .entry(image)
            .or_insert_with(|| thumbnail(&sample.path))
            .clone();
        let n = page.labels.len();
        let row = &ev.probs[image * n..(image + 1) * n];
        let truth: Vec<&str> = (0..n)
            .filter(|&k| ev.targets[image * n + k] >= 0.5)
            .map(|k| page.labels[k].as_str())
            .collect();
        let predicted: Vec<String> = (0..n)
            .filter(|&k| row[k] > ev.thresholds[k])
            .map(|k| format!("{} {:.3}", page.labels[k], row[k]))
            .collect();
        let (truth, predicted) = (capped(truth), capped(predicted));
        let shown = sample.path.strip_prefix(page.data).unwrap_or(&sample.path);
        let picture = match uri {
            Ok(uri) => {
                self.shown += 1;
                format!(
                    "<img alt=\"{}\" src=\"{uri}\">",
                    escape(&shown.display().to_string())
                )
            }
            Err(e) => format!("<p>(cannot show: {})</p>", escape(&e)),
        };
        format!(
            "<figure>{picture}<figcaption>{note}<br><b>{}</b><br>folder: {}<br>true: {}<br>predicted: {}</figcaption></figure>",
            escape(&shown.display().to_string()),
            escape(&sample.folder),
            escape(&truth.join(", ")),
            escape(&if predicted.is_empty() { "nothing".to_string() } else { predicted.join(", ") })
        )
    }
}

/// Most labels a figure's caption lists as true or predicted; the rest are counted.
const CAPTION_LABELS: usize = 20;
/// Most hierarchy violations (child, parent pairs) shown; `eval.json` lists them all.
const VIOLATIONS_SHOWN: usize = 50;

/// At most [`CAPTION_LABELS`] entries, then how many more there are.
fn capped<S: ToString>(mut list: Vec<S>) -> Vec<String> {
    let more = list.len().saturating_sub(CAPTION_LABELS);
    list.truncate(CAPTION_LABELS);
    let mut out: Vec<String> = list.iter().map(ToString::to_string).collect();
    if more > 0 {
        out.push(format!("and {more} more"));
    }
    out
}

fn violations(html: &mut String, ev: &Evaluation, page: &Page, thumbs: &mut Thumbnails) {
    *html += "<h2>Hierarchy violations</h2>";
    let n = page.labels.len();
    let mut any = false;
    // The pairs eval counted any image for (the page's hierarchy is the report's, in order).
    let counted = &ev.report.hierarchy_violations;
    let violated = page
        .hierarchy
        .iter()
        .enumerate()
        .filter(|(k, _)| counted.get(*k).is_none_or(|v| v.images > 0));
    let total = counted.iter().filter(|v| v.images > 0).count();
    for (_, &(child, parent)) in violated.take(VIOLATIONS_SHOWN) {
        let images: Vec<usize> = (0..ev.samples.len())
            .filter(|&i| {
                let r = &ev.probs[i * n..(i + 1) * n];
                r[child] > ev.thresholds[child] && r[parent] <= ev.thresholds[parent]
            })
            .collect();
        if images.is_empty() {
            continue;
        }
        any = true;
        let _ = write!(
            html,
            "<h3>{} without {}: {} image(s)</h3><div class=\"grid\">",
            escape(&page.labels[child]),
            escape(&page.labels[parent]),
            images.len()
        );
        for &i in images.iter().take(page.per_label) {
            *html += &thumbs.figure(ev, page, i, "");
        }
        *html += "</div>";
    }
    if !any {
        *html += "<p>None: every child label was predicted with its parent.</p>";
    }
    if total > VIOLATIONS_SHOWN {
        let _ = write!(
            html,
            "<p>{} more pairs with violations are listed in eval.json.</p>",
            total - VIOLATIONS_SHOWN
        );
    }
}

fn mistakes(html: &mut String, ev: &Evaluation, page: &Page, thumbs: &mut Thumbnails) {
    *html +=
        "<h2>Mistakes worth a second look</h2><p>Per label, the misclassified images with the \
              largest loss: model errors, or mislabelled images in the dataset.</p>";
    for (l, label) in page.labels.iter().enumerate() {
        let _ = write!(
            html,
            "<h3 id=\"label-{}\">{}</h3>",
            escape(label),
            escape(label)
        );
        for (fp, title, class) in [
            (
                true,
                "False positives (predicted, not in the folder's labels)",
                "fp",
            ),
            (
                false,
                "False negatives (in the folder's labels, not predicted)",
                "fn",
            ),
        ] {
            let list: Vec<&Review> = ev
                .review
                .iter()
                .filter(|r| r.label == l && r.false_positive == fp)
                .take(page.per_label)
                .collect();
            let _ = write!(html, "<h4 class=\"{class}\">{title}: {}</h4>", list.len());
            if list.is_empty() {
                continue;
            }
            *html += "<div class=\"grid\">";
            for r in list {
                let p = ev.probs[r.image * page.labels.len() + l];
                let note = format!("#{} {} {:.3}", r.rank, escape(label), p);
                *html += &thumbs.figure(ev, page, r.image, &note);
            }
            *html += "</div>";
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
