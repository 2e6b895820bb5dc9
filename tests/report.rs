//! `trainer eval --report`: the page is self-contained, shows every top mistake as a thumbnail,
//! and renders in a real headless browser with every picture loaded.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;

/// `eval --report --review 3` of the Keras oracle model on the bundled dataset, into `out`.
fn report(out: &Path) -> String {
    let output = common::trainer()
        .args([
            "eval",
            "--device",
            "cpu",
            "--report",
            "--review",
            "3",
            "--weights",
        ])
        .arg(common::oracle().join("ndl_b0_model.hdf5"))
        .arg("--data")
        .arg(common::data())
        .arg("--output")
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    std::fs::read_to_string(out.join("report.html")).unwrap()
}

/// The values of every `attr="..."` in the page.
fn attributes<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let key = format!("{attr}=\"");
    html.match_indices(&key)
        .map(|(i, _)| {
            let rest = &html[i + key.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

#[test]
fn the_report_is_self_contained_and_shows_every_top_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let html = report(dir.path());
    assert!(html.len() < 5 << 20, "{} bytes", html.len());
    for banned in ["<link", "@import", "url(", "<iframe", "<object"] {
        assert!(!html.contains(banned), "{banned}");
    }
    let srcs = attributes(&html, "src");
    assert!(srcs.len() > 10);
    assert!(
        srcs.iter().all(|s| s.starts_with("data:image/")),
        "an external source"
    );
    assert!(attributes(&html, "href").iter().all(|h| h.starts_with('#')));
    // Every thumbnail is a small JPEG.
    let mut thumbnails = 0;
    for src in srcs
        .iter()
        .filter(|s| s.starts_with("data:image/jpeg;base64,"))
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&src["data:image/jpeg;base64,".len()..])
            .unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert!(
            img.width().max(img.height()) <= 160,
            "{}x{}",
            img.width(),
            img.height()
        );
        thumbnails += 1;
    }
    assert!(thumbnails > 10);
    // Both pictures are there.
    assert_eq!(
        srcs.iter()
            .filter(|s| s.starts_with("data:image/png"))
            .count(),
        2
    );
    // Every mistake of review.csv (the top 3 of each kind per label) is on the page, in its
    // label's section and with its path.
    let review = std::fs::read_to_string(dir.path().join("review.csv")).unwrap();
    let mut rows = 0;
    for record in csv::Reader::from_reader(review.as_bytes()).records() {
        let r = record.unwrap();
        let (label, rank, path) = (&r[0], &r[1], &r[5]);
        let relative = Path::new(path)
            .strip_prefix(common::data())
            .unwrap()
            .display()
            .to_string();
        let section_start = html.find(&format!("id=\"label-{label}\"")).unwrap();
        let section = &html[section_start..];
        let section = &section[..section[4..]
            .find("<h3 id=")
            .map(|e| e + 4)
            .unwrap_or(section.len())];
        assert!(
            section.contains(&format!("#{rank} {label} ")) && section.contains(&relative),
            "{label} #{rank} {relative} missing"
        );
        rows += 1;
    }
    assert!(rows >= 20, "{rows} mistakes");
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn headless(browser: &Path, profile: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn the_report_renders_in_a_headless_browser_with_every_picture_loaded() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium (scripts/setup installs it where it can)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let html = report(&dir.path().join("eval"));
    // The page's own DOM, after the load event: how many images decoded to a real size.
    let probe = dir.path().join("probe.html");
    std::fs::write(
        &probe,
        html + "<script>window.addEventListener('load',()=>{const i=[...document.images];\
         document.body.setAttribute('data-loaded',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script>",
    )
    .unwrap();
    let dom = headless(&browser, &dir.path().join("profile"))
        .args(["--virtual-time-budget=10000", "--dump-dom"])
        .arg(format!("file://{}", probe.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let loaded = attributes(&dom, "data-loaded");
    assert_eq!(loaded.len(), 1, "no load result in the DOM");
    let (ok, all) = loaded[0].split_once('/').unwrap();
    assert!(
        all.parse::<usize>().unwrap() > 10 && ok == all,
        "{} images loaded",
        loaded[0]
    );

    // A screenshot: not blank.
    let shot = dir.path().join("shot.png");
    let status = headless(&browser, &dir.path().join("profile2"))
        .args(["--window-size=1280,2400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!(
            "file://{}",
            dir.path().join("eval/report.html").display()
        ))
        .output()
        .unwrap();
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&status.stderr));
    common::assert_drawn_png(&shot, (1280, 2400));
}
