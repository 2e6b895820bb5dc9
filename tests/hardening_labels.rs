//! Hostile labels, taxonomies and file names: refused at the door with the file and the label
//! named, or, where legal, written into CSV files that Python's `csv` module reads back with the
//! header's field count and with formula fields neutralised; label counts bounded under a memory
//! limit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use trainer::data::taxonomy::{Taxonomy, MAX_LABELS};

/// Address-space limit of every `trainer` run here: far above what these runs use, far below
/// what a labels x labels matrix of a large label list, or one output per label of millions of
/// labels, would ask for.
const MEMORY_LIMIT: u64 = 6 << 30;

/// Labels that are legal but hostile to CSV files and spreadsheets.
const WEIRD_LABELS: [&str; 8] = [
    "=HYPERLINK(\"http://x\",\"y\")",
    "@cmd",
    "+1+1",
    "-2+3",
    "a,b",
    "say \"hi\"",
    "<i>x</i>&",
    "été plain",
];

/// File names that are legal on Linux and hostile to CSV files.
const WEIRD_FILES: [&str; 6] = [
    "a,\"b\"\r\nc.jpg",
    "=cmd.jpg",
    "@x.jpg",
    "+1.jpg",
    "-1.jpg",
    "tab\tname.jpg",
];

fn a_jpeg() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasetpdm/stamp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files[0].clone()
}

/// `trainer` with `args` in `dir`, under [`MEMORY_LIMIT`].
fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new("prlimit")
        .arg(format!("--as={MEMORY_LIMIT}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A refusal: a clean exit with an error (not a crash of an allocation beyond the limit).
fn refused(out: Output) -> String {
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: "), "{err}");
    err
}

/// The records of a CSV file as Python's `csv` module reads them; each must have the header's
/// field count, `fields` of them.
fn python_rows(path: &Path, fields: usize) -> Vec<Vec<String>> {
    let rows = common::python_csv(path);
    assert!(!rows.is_empty(), "{}", path.display());
    for row in &rows {
        assert_eq!(row.len(), fields, "{}: {row:?}", path.display());
    }
    rows
}

fn formula(field: &str) -> bool {
    field.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// A label as the CSV files write it.
fn neutralised(label: &str) -> String {
    if formula(label) {
        format!("'{label}")
    } else {
        label.to_string()
    }
}

/// A dataset of `per_folder` copies of a JPEG in each folder, named from `names` in turn
/// (`per_folder` at most `names.len()`).
fn dataset(root: &Path, folders: &[&str], names: &[&str], per_folder: usize) {
    for (f, folder) in folders.iter().enumerate() {
        std::fs::create_dir_all(root.join(folder)).unwrap();
        for i in 0..per_folder {
            let name = names[(f * per_folder + i) % names.len()];
            std::fs::copy(a_jpeg(), root.join(folder).join(name)).unwrap();
        }
    }
}

fn write_taxonomy(path: &Path, labels: &[String], folders: &[(&str, Vec<String>)]) {
    let folders: serde_json::Map<String, serde_json::Value> = folders
        .iter()
        .map(|(f, ls)| (f.to_string(), serde_json::json!(ls)))
        .collect();
    let json = serde_json::json!({ "labels": labels, "folders": folders });
    std::fs::write(path, json.to_string()).unwrap();
}

const FIT: &[&str] = &[
    "fit",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--image-size",
    "64",
    "--augment",
    "none",
    "--batch-size",
    "4",
    "--val-fraction",
    "0.5",
];

/// A checkpoint file holding only `taxonomy` in its metadata (no tensors): enough for the
/// metadata check, which comes first.
fn metadata_only_checkpoint(path: &Path, taxonomy: Taxonomy) {
    let meta = common::checkpoint_meta(taxonomy, 32);
    let header = serde_json::json!({
        "__metadata__": { "trainer": serde_json::to_string(&meta).unwrap() }
    })
    .to_string();
    let mut header = header.into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_taxonomies_are_refused_at_the_door_and_in_checkpoints_naming_the_file_and_the_label() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dataset(&d.join("data"), &["f"], &["a.jpg"], 1);
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let long = "x".repeat(300);
    let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}")).collect();
    type Case = (
        &'static str,
        Vec<String>,
        Vec<(&'static str, Vec<String>)>,
        String,
    );
    let cases: Vec<Case> = vec![
        (
            "empty",
            s(&["a", ""]),
            vec![("f", s(&["a"]))],
            "labels holds an empty name".into(),
        ),
        (
            "dup",
            s(&["a", "b", "a"]),
            vec![("f", s(&["a"]))],
            "labels lists 'a' twice".into(),
        ),
        (
            "long",
            vec!["a".into(), long.clone()],
            vec![("f", s(&["a"]))],
            format!("labels holds '{}…' (300 bytes; at most 200)", &long[..60]),
        ),
        (
            "newline",
            s(&["a", "b\r\nc"]),
            vec![("f", s(&["a"]))],
            "labels holds 'b\\r\\nc'".into(),
        ),
        (
            "unknown",
            s(&["a"]),
            vec![("f", s(&["a", "zz"]))],
            "folders: folder 'f' maps to 'zz', which is not in the label list".into(),
        ),
        (
            "listed_twice",
            s(&["a"]),
            vec![("f", s(&["a", "a"]))],
            "folders: folder 'f' lists 'a' twice".into(),
        ),
        (
            "many",
            many,
            vec![("f", s(&["l0"]))],
            "labels has 1001 entries; at most 1000".into(),
        ),
    ];
    for (name, labels, folders, expected) in cases {
        let file = d.join(format!("{name}.json"));
        write_taxonomy(&file, &labels, &folders);
        let run_dir = format!("runs/{name}");
        let mut args = FIT.to_vec();
        args.extend([
            "--data",
            "data",
            "--run",
            name,
            "--taxonomy",
            file.to_str().unwrap(),
        ]);
        let err = refused(run(d, &args));
        // Read from the file, the list stops at the limit; built in memory, it is counted.
        let from_file = expected.replace("has 1001 entries", "has more than 1000 entries");
        assert!(
            err.contains(&format!("{}: ", file.display())),
            "{name}: {err}"
        );
        assert!(err.contains(&from_file), "{name}: {err}");
        assert!(!d.join(&run_dir).exists(), "{name}: nothing is created");

        // A checkpoint carrying the same taxonomy is refused by the same rules.
        let taxonomy = Taxonomy {
            labels,
            folders: folders
                .into_iter()
                .map(|(f, ls)| (f.to_string(), ls))
                .collect(),
        };
        let ckpt = d.join(format!("{name}.ckpt"));
        metadata_only_checkpoint(&ckpt, taxonomy);
        let err = refused(run(
            d,
            &[
                "eval",
                "--device",
                "cpu",
                "--weights",
                ckpt.to_str().unwrap(),
                "--data",
                "data",
                "--output",
                "ev",
            ],
        ));
        assert!(err.contains(&ckpt.display().to_string()), "{name}: {err}");
        let expected = match name {
            "many" => from_file,
            _ => format!("taxonomy.{expected}"),
        };
        assert!(err.contains(&expected), "{name}: {err}");
    }
}

#[test]
fn a_folder_given_twice_and_a_two_million_label_file_are_refused_under_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dataset(&d.join("data"), &["f"], &["a.jpg"], 1);
    let dup = d.join("dup.json");
    std::fs::write(
        &dup,
        r#"{"labels": ["a", "b"], "folders": {"f": ["a"], "g": ["b"], "f": ["b"]}}"#,
    )
    .unwrap();
    let huge = d.join("huge.json");
    let labels: Vec<String> = (0..2_000_000).map(|i| format!("\"label{i}\"")).collect();
    std::fs::write(
        &huge,
        format!(
            r#"{{"labels": [{}], "folders": {{"f": ["label0"]}}}}"#,
            labels.join(",")
        ),
    )
    .unwrap();
    assert!(std::fs::metadata(&huge).unwrap().len() > 20_000_000);
    for (file, expected) in [
        (&dup, "folders: folder 'f' is given twice"),
        (&huge, "larger than any taxonomy"),
    ] {
        let mut args = FIT.to_vec();
        args.extend([
            "--data",
            "data",
            "--run",
            "x",
            "--taxonomy",
            file.to_str().unwrap(),
        ]);
        let err = refused(run(d, &args));
        assert!(err.contains(&format!("{}: ", file.display())), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    assert!(!d.join("runs/x").exists());
}

#[test]
fn eval_of_a_checkpoint_with_100000_labels_is_refused_under_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dataset(&d.join("data"), &["f"], &["a.jpg"], 1);
    let labels: Vec<String> = (0..100_000).map(|i| format!("label{i}")).collect();
    let taxonomy = Taxonomy {
        folders: [("f".to_string(), labels.clone())].into(),
        labels,
    };
    let ckpt = d.join("wide.ckpt");
    metadata_only_checkpoint(&ckpt, taxonomy);
    let err = refused(run(
        d,
        &[
            "eval",
            "--device",
            "cpu",
            "--weights",
            ckpt.to_str().unwrap(),
            "--data",
            "data",
            "--output",
            "ev",
        ],
    ));
    assert!(err.contains(&ckpt.display().to_string()), "{err}");
    assert!(err.contains("labels has more than 1000 entries"), "{err}");
    assert!(!d.join("ev").exists());
}

/// Fields of `results.csv` for `labels` labels.
fn results_fields(labels: usize) -> usize {
    8 + 4 * labels
}

#[test]
fn weird_labels_and_file_names_give_csv_files_python_reads_with_formulas_neutralised() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let labels: Vec<String> = WEIRD_LABELS.iter().map(|s| s.to_string()).collect();
    let l = |i: usize| labels[i].clone();
    let folders = vec![
        ("=f,1", vec![l(0), l(4)]),
        ("-f \"2\"", vec![l(1), l(2), l(3), l(5), l(6)]),
        ("plain", vec![l(7)]),
    ];
    write_taxonomy(&d.join("t.json"), &labels, &folders);
    let names: Vec<&str> = folders.iter().map(|(f, _)| *f).collect();
    // A dataset folder whose name starts a formula, so that review.csv's paths do too.
    dataset(&d.join("=data"), &names, &WEIRD_FILES, 3);
    let mut args = FIT.to_vec();
    args.extend(["--data", "=data", "--run", "w", "--taxonomy", "t.json"]);
    common::ok(run(d, &args));

    let header_and_rows = |expected_rows: usize| {
        let rows = python_rows(&d.join("runs/w/results.csv"), results_fields(labels.len()));
        assert_eq!(rows.len(), 1 + expected_rows);
        for label in &labels {
            assert!(rows[0].contains(&format!("f1/{label}")), "{:?}", rows[0]);
        }
        assert!(rows.iter().flatten().all(|f| !formula(f)), "{rows:?}");
    };
    header_and_rows(1);
    // The checkpoints fit wrote are accepted: resume, eval, infer.
    common::ok(run(
        d,
        &[
            "fit", "--device", "cpu", "--resume", "runs/w", "--epochs", "2",
        ],
    ));
    header_and_rows(2);
    assert!(d.join("runs/w/results.png").exists());

    common::ok(run(
        d,
        &[
            "eval",
            "--device",
            "cpu",
            "--weights",
            "runs/w/last.ckpt",
            "--data",
            "=data",
            "--output",
            "ev",
            "--threshold",
            "0",
            "--review",
            "9",
            "--report",
        ],
    ));
    let eval = python_rows(&d.join("ev/eval.csv"), 10);
    let shown: Vec<&str> = eval[1..1 + labels.len()]
        .iter()
        .map(|r| r[0].as_str())
        .collect();
    let expected: Vec<String> = labels.iter().map(|l| neutralised(l)).collect();
    assert_eq!(shown, expected);
    assert!(eval.iter().flatten().all(|f| !formula(f)), "{eval:?}");

    let review = python_rows(&d.join("ev/review.csv"), 8);
    assert!(review.len() > 5, "{review:?}");
    assert!(review.iter().flatten().all(|f| !formula(f)), "{review:?}");
    let mut paths: Vec<String> = review[1..].iter().map(|r| r[5].clone()).collect();
    paths.sort();
    paths.dedup();
    assert!(paths.iter().all(|p| p.starts_with("'=data/")), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.ends_with("a,\"b\"\r\nc.jpg")),
        "{paths:?}"
    );
    for r in &review[1..] {
        assert!(expected.contains(&r[0]), "{r:?}");
    }

    let html = std::fs::read_to_string(d.join("ev/report.html")).unwrap();
    assert!(html.contains("&lt;i&gt;x&lt;/i&gt;&amp;"));
    assert!(!html.contains("<i>x</i>"));

    // infer's JSON carries the labels as they are (JSON strings, not spreadsheet fields).
    std::fs::create_dir_all(d.join("in/book")).unwrap();
    std::fs::copy(a_jpeg(), d.join("in/book/p.jpg")).unwrap();
    common::ok(run(
        d,
        &[
            "infer",
            "--device",
            "cpu",
            "--weights",
            "runs/w/last.ckpt",
            "--input",
            "in",
            "--output",
            "out",
            "--threshold",
            "0",
        ],
    ));
    let json = std::fs::read_to_string(d.join("out/book.json")).unwrap();
    let tags: Vec<String> = json_strings(&serde_json::from_str(&json).unwrap(), "tag");
    for label in &labels {
        assert!(tags.contains(label), "{label} not in {json}");
    }

    // val.txt holds one line per validation image, the names with CR and LF included, and
    // eval --split finds every one of them.
    let val = std::fs::read_to_string(d.join("runs/w/val.txt")).unwrap();
    assert!(
        val.contains("c.jpg") && val.contains("\\r\\nc.jpg"),
        "{val}"
    );
    let split = [
        "eval",
        "--device",
        "cpu",
        "--weights",
        "runs/w/last.ckpt",
        "--data",
        "=data",
        "--output",
        "sp",
        "--split",
        "runs/w",
    ];
    common::ok(run(d, &split));
    let report = std::fs::read_to_string(d.join("sp/eval.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["images"].as_u64(),
        Some(val.lines().count() as u64),
        "{val}"
    );
}

/// Every string value of key `key` anywhere in `v`.
fn json_strings(v: &serde_json::Value, key: &str) -> Vec<String> {
    match v {
        serde_json::Value::Object(o) => o
            .iter()
            .flat_map(|(k, x)| match (k == key, x.as_str()) {
                (true, Some(s)) => vec![s.to_string()],
                _ => json_strings(x, key),
            })
            .collect(),
        serde_json::Value::Array(a) => a.iter().flat_map(|x| json_strings(x, key)).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn the_most_labels_train_and_evaluate_in_bounded_pictures_under_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every label on one folder, half of them on another: 500 x 500 implied (child, parent)
    // pairs, the most a taxonomy of this size can have with two folders.
    let labels: Vec<String> = (0..MAX_LABELS).map(|i| format!("=L{i}")).collect();
    let half = labels[..MAX_LABELS / 2].to_vec();
    write_taxonomy(
        &d.join("t.json"),
        &labels,
        &[("all", labels.clone()), ("half", half)],
    );
    dataset(&d.join("data"), &["all", "half"], &["a.jpg", "b.jpg"], 2);
    let mut args = FIT.to_vec();
    args.extend(["--data", "data", "--run", "m", "--taxonomy", "t.json"]);
    common::ok(run(d, &args));
    let rows = python_rows(&d.join("runs/m/results.csv"), results_fields(MAX_LABELS));
    assert_eq!(rows.len(), 2);
    common::ok(run(
        d,
        &[
            "eval",
            "--device",
            "cpu",
            "--weights",
            "runs/m/last.ckpt",
            "--data",
            "data",
            "--output",
            "ev",
            "--review",
            "1",
            "--report",
        ],
    ));
    // The confusion picture shows 32 labels, not 1,000 (a 64,240-pixel square).
    let png = image::image_dimensions(d.join("ev/confusion.png")).unwrap();
    assert_eq!(png, (200 + 32 * 64 + 40, 70 + 32 * 64 + 200));
    let eval = python_rows(&d.join("ev/eval.csv"), 10);
    assert_eq!(eval.len(), 1 + MAX_LABELS + 2);
    assert!(eval[1..=MAX_LABELS].iter().all(|r| r[0].starts_with("'=L")));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ev/eval.json")).unwrap()).unwrap();
    let violations = report["hierarchy_violations"].as_array().unwrap();
    assert_eq!(violations.len(), 250_000);
    assert_eq!(violations[0]["child"], "=L500");
    assert_eq!(violations[0]["parent"], "=L0");
    let html = std::fs::metadata(d.join("ev/report.html")).unwrap().len();
    assert!(html < 20_000_000, "report.html is {html} bytes");
}
