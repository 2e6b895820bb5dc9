//! `trainer fetch` against a local HTTP server on 127.0.0.1 that plays the library's API and IIIF
//! server, faults included.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Requests seen per path (without the query).
    hits: HashMap<String, usize>,
    image_requests: usize,
    sizes: Vec<String>,
}

struct Server {
    base: String,
    state: Arc<Mutex<State>>,
}

fn jpeg() -> Vec<u8> {
    let dir = common::sample().join("labelled/stamp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    std::fs::read(&files[0]).unwrap()
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

/// API items for a tag: `n` normal ones, plus the given special pids.
fn items(tag: &str, n: usize, special: &[&str]) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({"id": format!("{tag}_{i}"), "pid": format!("{}", 1000 + i), "page": i + 1,
                "x": 10.5, "y": 20, "w": 30.25, "h": 40.0, "graphictags": [{"tagname": tag}]})
        })
        .collect();
    for (k, pid) in special.iter().enumerate() {
        let tags = if *pid == "untagged" {
            serde_json::json!([])
        } else {
            serde_json::json!([{"tagname": tag}])
        };
        v.push(
            serde_json::json!({"id": format!("{tag}_{pid}"), "pid": pid, "page": 900 + k,
            "x": 1, "y": 2, "w": 3, "h": 4, "graphictags": tags}),
        );
    }
    v
}

fn handle(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    pools: Arc<HashMap<String, Vec<serde_json::Value>>>,
    body: Arc<Vec<u8>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let hits = {
        let mut s = state.lock().unwrap();
        let n = s.hits.entry(path.to_string()).or_default();
        *n += 1;
        *n
    };
    if path.ends_with("/randomwithfacet") {
        let params: HashMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let size: usize = params["size"].parse().unwrap();
        let pool = &pools[params["f-graphictags.tagname"]];
        // "Random" items: a rotating window over the pool, so repeats happen.
        let start = (hits * 3) % pool.len();
        let page: Vec<_> = (0..size.min(pool.len()))
            .map(|i| pool[(start + i) % pool.len()].clone())
            .collect();
        respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            serde_json::to_string(&page).unwrap().as_bytes(),
        );
        return;
    }
    if let Some(rest) = path.strip_prefix("/iiif/") {
        let parts: Vec<&str> = rest.split('/').collect();
        let pid = parts[0];
        {
            let mut s = state.lock().unwrap();
            s.image_requests += 1;
            s.sizes.push(parts[parts.len() - 3].to_string());
        }
        match pid {
            "500once" if hits == 1 => {
                respond(&mut stream, "500 Internal Server Error", &[], b"oops")
            }
            "429once" if hits == 1 => respond(
                &mut stream,
                "429 Too Many Requests",
                &[("Retry-After", "1".into())],
                b"slow down",
            ),
            "404" => respond(&mut stream, "404 Not Found", &[], b"no such image"),
            "cut" => respond(
                &mut stream,
                "200 OK",
                &[("Content-Length", (body.len() * 2).to_string())],
                &body[..body.len() / 2],
            ),
            "html" => respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "text/html".into())],
                b"<html><body>Service temporarily unavailable</body></html>",
            ),
            "stall" => std::thread::sleep(Duration::from_secs(4)),
            "redirect_file" => respond(
                &mut stream,
                "302 Found",
                &[("Location", "file:///etc/passwd".into())],
                b"",
            ),
            "redirect_ok" => respond(
                &mut stream,
                "301 Moved Permanently",
                &[(
                    "Location",
                    "/iiif/moved/R0000001/full/,256/0/default.jpg".into(),
                )],
                b"",
            ),
            "redirect_loop" => respond(
                &mut stream,
                "302 Found",
                &[("Location", path.to_string())],
                b"",
            ),
            "retry_forever" => respond(
                &mut stream,
                "503 Service Unavailable",
                &[("Retry-After", "999999".into())],
                b"",
            ),
            "huge" => respond(
                &mut stream,
                "200 OK",
                &[("Content-Length", "100000000000".into())],
                b"",
            ),
            "bomb" => respond(
                &mut stream,
                "200 OK",
                &[],
                &common::jpeg_claiming(&body, 65000, 65000),
            ),
            "drip" => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes());
                for b in body.iter().take(40) {
                    if stream.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            _ => respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "image/jpeg".into())],
                &body,
            ),
        }
        return;
    }
    respond(&mut stream, "404 Not Found", &[], b"");
}

fn serve(pools: HashMap<String, Vec<serde_json::Value>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(State::default()));
    let (st, pools, body) = (state.clone(), Arc::new(pools), Arc::new(jpeg()));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (st, pools, body) = (st.clone(), pools.clone(), body.clone());
            std::thread::spawn(move || handle(stream, st, pools, body));
        }
    });
    Server { base, state }
}

fn fetch(server: &Server, out: &Path, extra: &[&str]) -> (bool, String) {
    let api = format!("{}/api", server.base);
    let iiif = format!("{}/iiif", server.base);
    let output = common::trainer()
        .args([
            "fetch",
            "--out",
            out.to_str().unwrap(),
            "--api-base",
            &api,
            "--iiif-base",
            &iiif,
            "--delay-ms",
            "0",
            "--backoff-ms",
            "50",
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every file under `dir` is a whole image (no partial, temporary or non-image file).
fn all_whole_images(dir: &Path) -> usize {
    let mut n = 0;
    for folder in std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        for f in std::fs::read_dir(folder.path()).unwrap().flatten() {
            let p = f.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".jpg") && !name.starts_with('.'),
                "stray file {}",
                p.display()
            );
            trainer::data::decode::read_bgr(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    n
}

#[test]
fn fetches_exactly_n_per_tag_and_a_second_run_downloads_nothing() {
    let pools = HashMap::from([
        ("stamp".to_string(), items("stamp", 12, &["untagged"])),
        ("graphic_map".to_string(), items("graphic_map", 9, &[])),
    ]);
    let server = serve(pools);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let args = [
        "--tag",
        "stamp",
        "--tag",
        "graphic_map",
        "--count",
        "5",
        "--size",
        "4",
        "--jobs",
        "3",
    ];
    let (ok, stderr) = fetch(&server, &out, &args);
    assert!(ok, "{stderr}");
    assert_eq!(common::file_names(&out.join("stamp")).len(), 5, "{stderr}");
    assert_eq!(
        common::file_names(&out.join("graphic_map")).len(),
        5,
        "{stderr}"
    );
    all_whole_images(&out);
    let first = server.state.lock().unwrap().image_requests;
    assert!(first >= 10);
    let log = std::fs::read_to_string(out.join("fetch.csv")).unwrap();
    assert!(log.starts_with("id,pid,page,region,tags,url,status\n"));
    assert!(
        log.contains("/iiif/1000/R0000001/pct:10.5,20,30.25,40.0/,256/0/default.jpg\",saved"),
        "{log}"
    );

    let before = (
        common::file_names(&out.join("stamp")),
        common::file_names(&out.join("graphic_map")),
    );
    let (ok, stderr) = fetch(&server, &out, &args);
    assert!(ok, "{stderr}");
    assert_eq!(
        server.state.lock().unwrap().image_requests,
        first,
        "the second run downloaded images"
    );
    assert_eq!(
        (
            common::file_names(&out.join("stamp")),
            common::file_names(&out.join("graphic_map"))
        ),
        before
    );
    assert!(stderr.contains("saved 0"), "{stderr}");
}

#[test]
fn server_faults_are_retried_or_logged_and_never_leave_partial_files() {
    let special = [
        "500once", "429once", "404", "cut", "html", "stall", "untagged",
    ];
    let server = serve(HashMap::from([(
        "faults".to_string(),
        items("faults", 1, &special),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let args = [
        "--tag",
        "faults",
        "--count",
        "10",
        "--size",
        "8",
        "--timeout",
        "1",
        "--retries",
        "2",
        "--patience",
        "1",
        "--jobs",
        "4",
    ];
    let (ok, stderr) = fetch(&server, &out, &args);
    assert!(!ok, "failures must show in the exit status:\n{stderr}");
    let saved = common::file_names(&out.join("faults"));
    assert_eq!(
        saved,
        ["faults_0.jpg", "faults_429once.jpg", "faults_500once.jpg"],
        "{stderr}"
    );
    assert_eq!(
        common::file_names(&out.join("unknown")),
        ["faults_untagged.jpg"]
    );
    assert_eq!(all_whole_images(&out), 4);
    let log = std::fs::read_to_string(out.join("fetch.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(log.as_bytes())
        .records()
        .map(|r| r.unwrap())
        .collect();
    let status = |id: &str| -> String {
        let matching: Vec<&csv::StringRecord> = rows.iter().filter(|r| &r[0] == id).collect();
        assert_eq!(
            matching.len(),
            1,
            "{id} logged {} times:\n{log}",
            matching.len()
        );
        matching[0][6].to_string()
    };
    assert_eq!(status("faults_500once"), "saved after 1 retries");
    assert_eq!(status("faults_429once"), "saved after 1 retries");
    assert_eq!(status("faults_404"), "failed: HTTP 404");
    assert!(
        status("faults_cut").starts_with("failed after 2 retries: body cut short"),
        "{log}"
    );
    assert!(
        status("faults_html").starts_with("failed: not an image"),
        "{log}"
    );
    assert!(
        status("faults_stall").starts_with("failed after 2 retries"),
        "{log}"
    );
    let hits = server.state.lock().unwrap().hits.clone();
    let path_of =
        |pid: &str, page: usize| format!("/iiif/{pid}/R{page:07}/pct:1,2,3,4/,256/0/default.jpg");
    assert_eq!(hits[&path_of("404", 902)], 1, "no retry on 404");
    assert_eq!(hits[&path_of("cut", 903)], 3, "a cut body is retried");
}

#[test]
fn metadata_rows_land_in_their_label_folders() {
    let server = serve(HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    // A 20-row excerpt of the real metadata.csv, a few rows from each label.
    let text =
        std::fs::read_to_string(common::shared().join("data/ndl-imagelabel/metadata.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.step_by(320).take(20).collect();
    assert_eq!(rows.len(), 20);
    let csv = dir.path().join("metadata.csv");
    std::fs::write(&csv, format!("{header}\n{}\n", rows.join("\n"))).unwrap();
    let out = dir.path().join("data");
    let (ok, stderr) = fetch(
        &server,
        &out,
        &["--metadata", csv.to_str().unwrap(), "--jobs", "4"],
    );
    assert!(ok, "{stderr}");
    let mut expected: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let mut f = r.split(',');
            (f.next().unwrap().to_string(), f.next().unwrap().to_string())
        })
        .collect();
    expected.sort();
    let mut found = Vec::new();
    for label in std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        for f in common::file_names(&label.path()) {
            found.push((f, label.file_name().to_string_lossy().into_owned()));
        }
    }
    found.sort();
    assert_eq!(found, expected);
    assert_eq!(all_whole_images(&out), 20);
    let sizes = server.state.lock().unwrap().sizes.clone();
    assert_eq!(sizes.len(), 20);
    assert!(sizes.iter().all(|s| s == ",256"), "{sizes:?}");
    // --limit and --label select a part; what is on disk is skipped.
    let (ok, stderr) = fetch(
        &server,
        &out,
        &["--metadata", csv.to_str().unwrap(), "--limit", "3"],
    );
    assert!(ok && stderr.contains("saved 0, skipped 3"), "{stderr}");
}

/// Every file under `dir`, recursively, relative to it.
fn all_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_answers_are_refused_and_nothing_lands_outside_out() {
    let mut pool = items(
        "h",
        1,
        &[
            "redirect_ok",
            "redirect_file",
            "redirect_loop",
            "drip",
            "huge",
            "bomb",
        ],
    );
    for (id, pid) in [
        ("../../../escape", "1"),
        ("/tmp/abs", "1"),
        ("ok_id", "../../x"),
        ("ok2", "/etc"),
    ] {
        pool.push(
            serde_json::json!({"id": id, "pid": pid, "page": 1, "x": 1, "y": 2, "w": 3, "h": 4,
            "graphictags": [{"tagname": "h"}]}),
        );
    }
    pool.push(
        serde_json::json!({"id": "inj", "pid": "1", "page": 1, "x": "1/../../admin", "y": 2,
        "w": 3, "h": 4, "graphictags": [{"tagname": "h"}]}),
    );
    let server = serve(HashMap::from([("h".to_string(), pool)]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a/b/data");
    let start = std::time::Instant::now();
    let args = [
        "--tag",
        "h",
        "--count",
        "20",
        "--size",
        "12",
        "--timeout",
        "1",
        "--retries",
        "1",
        "--patience",
        "1",
        "--jobs",
        "4",
    ];
    let (ok, stderr) = fetch(&server, &out, &args);
    assert!(!ok, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    let files = all_files(dir.path());
    assert_eq!(
        files,
        [
            "a/b/data/fetch.csv",
            "a/b/data/h/h_0.jpg",
            "a/b/data/h/h_redirect_ok.jpg"
        ],
        "{stderr}"
    );
    let log = std::fs::read_to_string(out.join("fetch.csv")).unwrap();
    let status = |id: &str| -> String {
        let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(log.as_bytes())
            .records()
            .map(|r| r.unwrap())
            .filter(|r| &r[0] == id)
            .collect();
        assert_eq!(rows.len(), 1, "{id}:\n{log}");
        rows[0][6].to_string()
    };
    assert!(
        status("h_redirect_file").contains("only http and https are followed"),
        "{log}"
    );
    assert!(
        status("h_redirect_loop").contains("more than 5 redirects"),
        "{log}"
    );
    assert!(status("h_drip").contains("failed after 1 retries"), "{log}");
    assert!(status("h_huge").contains("over the limit"), "{log}");
    assert!(status("h_bomb").contains("65000x65000"), "{log}");
    assert!(stderr.contains("unsafe id or pid"), "{stderr}");
    assert!(stderr.contains("'x' is not a number"), "{stderr}");
    assert!(stderr.contains("stopped short of --count 20"), "{stderr}");

    // A tag or a metadata label that is a path never becomes one.
    let (ok, stderr) = fetch(&server, &out, &["--tag", "../../evil", "--count", "1"]);
    assert!(!ok && stderr.contains("--tag '../../evil'"), "{stderr}");
    let csv = dir.path().join("m.csv");
    std::fs::write(
        &csv,
        "file,label,path,title,url,iiif\nx.jpg,..,p,t,u,http://127.0.0.1:1/iiif/1/R1/full/full/0/default.jpg\n\
         ../y.jpg,stamp,p,t,u,http://127.0.0.1:1/iiif/1/R1/full/full/0/default.jpg\n",
    )
    .unwrap();
    let (ok, stderr) = fetch(&server, &out, &["--metadata", csv.to_str().unwrap()]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("row 2: skipped: unsafe name '..'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("row 3: skipped: unsafe name '../y.jpg'"),
        "{stderr}"
    );
    assert_eq!(
        all_files(dir.path()).len(),
        4,
        "{:?}",
        all_files(dir.path())
    );
}

#[test]
fn a_huge_retry_after_is_capped_and_ctrl_c_interrupts_the_wait() {
    assert_eq!(stop_during_a_retry_wait("-INT"), Some(130));
    assert_eq!(trainer::fetch::MAX_WAIT, Duration::from_secs(60));
}

#[test]
fn sigterm_interrupts_the_wait_as_ctrl_c_does() {
    assert_eq!(stop_during_a_retry_wait("-TERM"), Some(143));
}

/// Sends `signal` (a `kill` flag) to a fetch waiting out a server's huge Retry-After; checks it
/// stops within seconds and returns its exit code.
fn stop_during_a_retry_wait(signal: &str) -> Option<i32> {
    let server = serve(HashMap::from([(
        "r".to_string(),
        items("r", 0, &["retry_forever"]),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let child = common::trainer()
        .args([
            "fetch",
            "--out",
            out.to_str().unwrap(),
            "--api-base",
            &format!("{}/api", server.base),
            "--iiif-base",
            &format!("{}/iiif", server.base),
            "--tag",
            "r",
            "--count",
            "1",
            "--delay-ms",
            "0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while server.state.lock().unwrap().image_requests == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no image request"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{signal} took {:?}",
        sent.elapsed()
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    output.status.code()
}

#[test]
fn server_strings_in_fetch_csv_are_quoted_and_neutralised() {
    let hostile_tags = [
        "=HYPERLINK(\"http://x\",\"y\")",
        "@cmd,\"q\"\r\nx",
        "hostile",
    ];
    let item = serde_json::json!({"id": "-2", "pid": "-3", "page": 1, "x": 1, "y": 2, "w": 3,
        "h": 4, "graphictags": hostile_tags.map(|t| serde_json::json!({"tagname": t}))});
    let server = serve(HashMap::from([("hostile".to_string(), vec![item])]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let args = ["--tag", "hostile", "--count", "1", "--size", "1"];
    let (ok, stderr) = fetch(&server, &out, &args);
    assert!(ok, "{stderr}");
    assert_eq!(common::file_names(&out.join("hostile")), ["-2.jpg"]);
    let rows = common::python_csv(&out.join("fetch.csv"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0],
        ["id", "pid", "page", "region", "tags", "url", "status"]
    );
    let row = &rows[1];
    assert_eq!(row.len(), 7, "{row:?}");
    assert_eq!((row[0].as_str(), row[1].as_str()), ("'-2", "'-3"));
    assert_eq!(row[4], format!("'{}", hostile_tags.join(";")));
    assert_eq!(row[6], "saved");
    assert!(
        rows.iter()
            .flatten()
            .all(|f| !f.starts_with(['=', '+', '-', '@', '\t', '\r'])),
        "{rows:?}"
    );
}

#[test]
fn a_link_planted_as_fetch_csv_is_not_followed() {
    let server = serve(HashMap::from([(
        "stamp".to_string(),
        items("stamp", 2, &[]),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    std::fs::create_dir_all(&out).unwrap();
    let victim = dir.path().join("notes.txt");
    std::fs::write(&victim, "mine\n").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("fetch.csv")).unwrap();
    let (ok, stderr) = fetch(&server, &out, &["--tag", "stamp", "--count", "1"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("fetch.csv") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine\n");
}
