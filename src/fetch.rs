//! `trainer fetch`: grow a dataset from the library's illustration API, or rebuild the public
//! dataset from its `metadata.csv`, through the IIIF Image API. A polite, resumable client: a
//! concurrency limit, a minimum delay between requests, timeouts, retries with backoff (honouring
//! `Retry-After`), and only whole, decodable images ever land on disk.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::csvfile;
use crate::data::decode::decode_bgr;
use crate::fsutil::write_atomic;
use crate::progress;

pub const DEFAULT_API_BASE: &str = "https://lab.ndl.go.jp/dl/api/illustration";
pub const DEFAULT_IIIF_BASE: &str = "https://www.dl.ndl.go.jp/api/iiif";
/// Largest body accepted (an illustration at 256 px is tens of kB).
pub const MAX_BODY: u64 = 64 << 20;
/// Longest wait before a retry, whatever a `Retry-After` header asks.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Redirects followed per request (only to http or https addresses).
pub const MAX_REDIRECTS: usize = 5;

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub jobs: usize,
    pub delay: Duration,
    pub timeout: Duration,
    pub retries: u32,
    /// First backoff; doubled at each retry (a `Retry-After` header takes precedence).
    pub backoff: Duration,
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
    #[error("not an image ({0})")]
    NotImage(String),
    /// An answer that retrying cannot fix: a redirect elsewhere than http(s), too many
    /// redirects, a body over the size limit.
    #[error("{0}")]
    Refused(String),
}

impl FetchError {
    fn retryable(&self) -> bool {
        match self {
            FetchError::Status(code) => *code == 429 || *code >= 500,
            FetchError::Transport(_) => true,
            FetchError::NotImage(_) | FetchError::Refused(_) => false,
        }
    }
}

/// An HTTP client with a global minimum delay between requests and retries.
pub struct Client {
    agent: ureq::Agent,
    opts: ClientOptions,
    next_slot: Mutex<Instant>,
}

impl Client {
    pub fn new(opts: ClientOptions) -> Self {
        // Redirects are followed by `attempt`, which checks where they lead.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout)
            .redirects(0)
            .user_agent(concat!(
                "trainer/",
                env!("CARGO_PKG_VERSION"),
                " (NDL illustration tagger dataset fetch; polite: limited concurrency and rate)"
            ))
            .build();
        Client {
            agent,
            opts,
            next_slot: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this request's turn: requests start at least `delay` apart.
    fn wait_turn(&self) {
        let wait = {
            let mut next = self.next_slot.lock().expect("rate limiter");
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + self.opts.delay;
            start - now
        };
        progress::sleep(wait);
    }

    /// One attempt: the whole body, or why not (with the server's Retry-After, if any). The
    /// timeout is one deadline for the whole request, redirects and body included.
    fn attempt(&self, url: &str) -> (Result<Vec<u8>, FetchError>, Option<Duration>) {
        self.wait_turn();
        let deadline = Instant::now() + self.opts.timeout;
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.agent.get(&current).timeout(remaining).call() {
                Ok(resp) if (300..400).contains(&resp.status()) => {
                    match redirect_target(&current, &resp) {
                        Ok(next) => current = next,
                        Err(e) => return (Err(e), None),
                    }
                }
                Ok(resp) => return (read_body(resp), None),
                Err(ureq::Error::Status(code, resp)) => {
                    let retry_after = resp
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_WAIT));
                    return (Err(FetchError::Status(code)), retry_after);
                }
                Err(ureq::Error::Transport(t)) => {
                    return (Err(FetchError::Transport(t.to_string())), None)
                }
            }
        }
        let err = if Instant::now() >= deadline {
            FetchError::Transport(format!(
                "no answer within the {:.1} s deadline",
                self.opts.timeout.as_secs_f64()
            ))
        } else {
            FetchError::Refused(format!("more than {MAX_REDIRECTS} redirects"))
        };
        (Err(err), None)
    }

    /// GET with retries on timeouts, cut bodies, 429 and 5xx; `check` validates the body (a
    /// failed check is final).
    pub fn get(
        &self,
        url: &str,
        check: impl Fn(&[u8]) -> Result<(), FetchError>,
    ) -> (Result<Vec<u8>, FetchError>, u32) {
        let mut attempt = 0;
        loop {
            let (result, retry_after) = self.attempt(url);
            let result = result.and_then(|b| check(&b).map(|_| b));
            match result {
                Err(e)
                    if e.retryable() && attempt < self.opts.retries && !progress::interrupted() =>
                {
                    progress::sleep(retry_wait(retry_after, self.opts.backoff, attempt));
                    attempt += 1;
                }
                other => return (other, attempt),
            }
        }
    }
}

/// The wait before retry number `attempt + 1`: the server's Retry-After, else the backoff doubled
/// at each attempt; never more than [`MAX_WAIT`].
pub fn retry_wait(retry_after: Option<Duration>, backoff: Duration, attempt: u32) -> Duration {
    retry_after
        .unwrap_or(backoff.saturating_mul(2u32.saturating_pow(attempt)))
        .min(MAX_WAIT)
}

/// Where a 3xx answer points, resolved against the request's address; only http and https.
fn redirect_target(current: &str, resp: &ureq::Response) -> Result<String, FetchError> {
    let location = resp
        .header("Location")
        .ok_or_else(|| FetchError::Refused(format!("HTTP {} without a Location", resp.status())))?;
    let next = url::Url::parse(current)
        .and_then(|base| base.join(location))
        .map_err(|e| FetchError::Refused(format!("bad redirect to '{location}': {e}")))?;
    if !is_web(&next) {
        return Err(FetchError::Refused(format!(
            "redirect to '{location}' refused: only http and https are followed"
        )));
    }
    Ok(next.into())
}

/// The whole body of a 2xx answer, at most [`MAX_BODY`] bytes, checked against Content-Length.
fn read_body(resp: ureq::Response) -> Result<Vec<u8>, FetchError> {
    let expected: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    if expected.is_some_and(|n| n > MAX_BODY) {
        return Err(FetchError::Refused(format!(
            "body of {} bytes is over the limit of {MAX_BODY}",
            expected.unwrap_or(0)
        )));
    }
    let mut body = Vec::new();
    match resp.into_reader().take(MAX_BODY + 1).read_to_end(&mut body) {
        Err(e) => Err(FetchError::Transport(format!("body cut short: {e}"))),
        Ok(n) if n as u64 > MAX_BODY => Err(FetchError::Refused(format!(
            "body over the limit of {MAX_BODY} bytes"
        ))),
        Ok(n) if expected.is_some_and(|e| e != n as u64) => Err(FetchError::Transport(format!(
            "body cut short: {n} of {} bytes",
            expected.unwrap_or(0)
        ))),
        Ok(_) => Ok(body),
    }
}

/// True for a name that is safe as one path component and in a URL: ASCII letters, digits, `_`,
/// `-` and `.`, not starting with `.`, at most 128 bytes.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// `out/<folder>/<file>`, with both names checked, and verified to lie under `out`.
fn dest_path(out: &Path, folder: &str, file: &str) -> Result<PathBuf, String> {
    for name in [folder, file] {
        if !is_safe_name(name) {
            return Err(format!("unsafe name '{name}'"));
        }
    }
    let dest = out.join(folder).join(file);
    let inside = dest.strip_prefix(out).is_ok_and(|rest| {
        rest.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    if inside {
        Ok(dest)
    } else {
        Err(format!("{} is not under {}", dest.display(), out.display()))
    }
}

/// Python's `str(x)` for a JSON number: integers as written, floats with at least one decimal.
fn python_number(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        Value::Number(n) => {
            let f = n.as_f64()?;
            Some(if f.fract() == 0.0 && f.abs() < 1e16 {
                format!("{f:.1}")
            } else {
                format!("{f}")
            })
        }
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// One illustration from the API.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiItem {
    pub id: String,
    pub pid: String,
    pub page: u64,
    /// `x,y,w,h` as the original formats it.
    pub region: String,
    pub tags: Vec<String>,
}

impl ApiItem {
    pub fn parse(v: &Value) -> Result<Self> {
        let field = |k: &str| {
            v.get(k)
                .with_context(|| format!("API item without '{k}': {v}"))
        };
        let text = |k: &str| -> Result<String> {
            python_number(field(k)?)
                .with_context(|| format!("API item field '{k}' is not a number or string: {v}"))
        };
        let page = match field("page")? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .with_context(|| format!("API item with an unreadable page: {v}"))?;
        let tags = match v.get("graphictags") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|t| match t {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("tagname").and_then(|n| n.as_str()).map(String::from),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let (id, pid) = (text("id")?, text("pid")?);
        if !is_safe_name(&id) || !is_safe_name(&pid) {
            bail!("API item with an unsafe id or pid (letters, digits, '_', '-', '.' only): {v}");
        }
        let number = |k: &str| -> Result<String> {
            let t = text(k)?;
            let numeric = t.parse::<f64>().is_ok_and(f64::is_finite)
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
            if !numeric {
                bail!("API item field '{k}' is not a number: {v}");
            }
            Ok(t)
        };
        Ok(ApiItem {
            id,
            pid,
            page,
            region: format!(
                "{},{},{},{}",
                number("x")?,
                number("y")?,
                number("w")?,
                number("h")?
            ),
            tags,
        })
    }

    /// The original's IIIF address: `<base>/<pid>/R<page, 7 digits>/pct:<x>,<y>,<w>,<h>/,<height>/0/default.jpg`.
    pub fn iiif_url(&self, base: &str, height: u32) -> String {
        format!(
            "{}/{}/R{:07}/pct:{}/,{height}/0/default.jpg",
            base.trim_end_matches('/'),
            self.pid,
            self.page,
            self.region
        )
    }
}

/// The `randomwithfacet` request for `size` random illustrations carrying `tag`.
pub fn api_url(base: &str, tag: &str, size: usize) -> String {
    format!(
        "{}/randomwithfacet?size={size}&f-graphictags.tagname={tag}",
        base.trim_end_matches('/')
    )
}

/// A metadata.csv IIIF address resized by the server to `height` (the size segment becomes
/// `,<height>`), with its base swapped for `iiif_base` when that differs from the default.
pub fn metadata_url(url: &str, height: u32, iiif_base: &str) -> Result<String> {
    let mut parts: Vec<&str> = url.trim().split('/').collect();
    if parts.len() < 5 {
        bail!("not a IIIF Image API address: {url}");
    }
    let size = format!(",{height}");
    let n = parts.len();
    parts[n - 3] = &size;
    let rebuilt = parts.join("/");
    let base = iiif_base.trim_end_matches('/');
    Ok(match rebuilt.strip_prefix(DEFAULT_IIIF_BASE) {
        Some(rest) if base != DEFAULT_IIIF_BASE => format!("{base}{rest}"),
        _ => rebuilt,
    })
}

/// Counts of a fetch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchSummary {
    pub saved: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Tags that stopped short of `--count`.
    pub short: usize,
    pub interrupted: bool,
}

/// Accepts a body only if it decodes as an image (a truncated JPEG or an HTML page does not).
fn check_image(bytes: &[u8]) -> Result<(), FetchError> {
    decode_bgr(bytes, Path::new("response"))
        .map(|_| ())
        .map_err(|e| FetchError::NotImage(e.to_string()))
}

/// Append-only `fetch.csv` log (written through [`csvfile`]).
struct Log(Mutex<std::fs::File>);

impl Log {
    fn open(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let path = out.join("fetch.csv");
        let new = !path.exists();
        // A symbolic link planted in its place is never followed (another file would grow).
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot open {} (a symbolic link there is refused)",
                    path.display()
                )
            })?;
        if new {
            writeln!(f, "id,pid,page,region,tags,url,status")?;
        }
        Ok(Log(Mutex::new(f)))
    }

    fn row(&self, fields: &[&str]) {
        // Every field comes from the server, the metadata or the command line.
        let line = csvfile::line(fields.iter().map(|f| csvfile::outside(f)));
        let mut f = self.0.lock().expect("log");
        let _ = f.write_all(line.as_bytes());
        let _ = f.flush();
    }
}

/// Downloads `url` into `dest` if it is a whole image. Returns the log status.
fn download(client: &Client, url: &str, dest: &Path) -> Result<String, String> {
    let (result, retries) = client.get(url, check_image);
    let note = if retries > 0 {
        format!(" after {retries} retries")
    } else {
        String::new()
    };
    match result {
        Ok(body) => match write_atomic(dest, &body) {
            Ok(()) => Ok(format!("saved{note}")),
            Err(e) => Err(format!("failed: {e:#}")),
        },
        Err(e) => Err(format!("failed{note}: {e}")),
    }
}

/// Ids of the images already under `out` (any folder): `<out>/<folder>/<id>.jpg`.
fn ids_on_disk(out: &Path) -> HashSet<String> {
    let mut ids = HashSet::new();
    if let Ok(dirs) = std::fs::read_dir(out) {
        for d in dirs.flatten().filter(|d| d.path().is_dir()) {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                for f in files.flatten() {
                    let p = f.path();
                    if p.extension().and_then(|e| e.to_str()) == Some("jpg") {
                        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                            ids.insert(stem.to_string());
                        }
                    }
                }
            }
        }
    }
    ids
}

fn count_jpgs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|f| f.path().extension().and_then(|e| e.to_str()) == Some("jpg"))
                .count()
        })
        .unwrap_or(0)
}

/// Settings of `fetch --tag`.
pub struct TagFetch {
    pub tags: Vec<String>,
    pub count: usize,
    pub out: PathBuf,
    pub api_base: String,
    pub iiif_base: String,
    pub height: u32,
    pub page_size: usize,
    /// API calls in a row that may bring nothing new before giving up on a tag.
    pub patience: usize,
}

/// Runs `items` downloads (`(url, dest, log fields)`) on `jobs` threads.
fn download_all(
    client: &Client,
    log: &Log,
    jobs: usize,
    items: Vec<(String, PathBuf, Vec<String>)>,
    summary: &Mutex<FetchSummary>,
    bar: &indicatif::ProgressBar,
) {
    let queue = Mutex::new(items.into_iter());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                if progress::interrupted() {
                    return;
                }
                let Some((url, dest, fields)) = queue.lock().expect("queue").next() else {
                    return;
                };
                let status = download(client, &url, &dest);
                let mut row: Vec<&str> = fields.iter().map(String::as_str).collect();
                row.push(&url);
                let text = match &status {
                    Ok(s) | Err(s) => s.clone(),
                };
                row.push(&text);
                log.row(&row);
                let mut sum = summary.lock().expect("summary");
                match status {
                    Ok(_) => sum.saved += 1,
                    Err(e) => {
                        sum.failed += 1;
                        bar.suspend(|| crate::errln!("{}: {e}", dest.display()));
                    }
                }
                bar.set_message(format!(
                    "saved {} skipped {} failed {}",
                    sum.saved, sum.skipped, sum.failed
                ));
                bar.inc(1);
            });
        }
    });
}

/// `fetch --tag`: random illustrations per tag until each `<out>/<tag>/` holds `count` images.
pub fn fetch_tags(client: &Client, f: &TagFetch) -> Result<FetchSummary> {
    if let Some(bad) = f.tags.iter().find(|t| !is_safe_name(t)) {
        bail!("--tag '{bad}': a tag is a folder name (letters, digits, '_', '-', '.'; not starting with '.')");
    }
    check_base(&f.api_base, "--api-base")?;
    check_base(&f.iiif_base, "--iiif-base")?;
    let log = Log::open(&f.out)?;
    remove_stale_downloads(&f.out);
    let summary = Mutex::new(FetchSummary::default());
    let bar = progress::bar((f.tags.len() * f.count) as u64, "images");
    bar.set_prefix("fetch");
    let mut run = TagRun {
        client,
        f,
        log,
        summary,
        bar,
        on_disk: ids_on_disk(&f.out),
        attempted: HashSet::new(),
    };
    for tag in &f.tags {
        run.fill(tag)?;
    }
    run.bar.finish_and_clear();
    let mut s = *run.summary.lock().expect("summary");
    s.interrupted = progress::interrupted();
    Ok(s)
}

/// One `fetch --tag` run, shared by its tags: the client and settings, the log, the running
/// totals, the progress bar and the ids already seen.
struct TagRun<'a> {
    client: &'a Client,
    f: &'a TagFetch,
    log: Log,
    summary: Mutex<FetchSummary>,
    bar: indicatif::ProgressBar,
    /// Ids of the images under the output folder when the run began.
    on_disk: HashSet<String>,
    /// Ids tried in this run (whatever came of it).
    attempted: HashSet<String>,
}

impl TagRun<'_> {
    /// Asks the API again and again until `<out>/<tag>/` holds `count` images, the run is
    /// interrupted, or `patience` calls in a row bring nothing new.
    fn fill(&mut self, tag: &str) -> Result<()> {
        let f = self.f;
        let tag_dir = f.out.join(tag);
        let mut idle_calls = 0;
        while count_jpgs(&tag_dir) < f.count && !progress::interrupted() {
            let have = count_jpgs(&tag_dir);
            self.bar.set_position(self.bar.position().max(have as u64));
            let items = self.api_items(&api_url(&f.api_base, tag, f.page_size))?;
            let batch = self.plan(tag, &items, f.count - have);
            let before = count_jpgs(&tag_dir);
            let n = batch.len();
            let jobs = self.client.opts.jobs;
            download_all(
                self.client,
                &self.log,
                jobs,
                batch,
                &self.summary,
                &self.bar,
            );
            if n == 0 || count_jpgs(&tag_dir) == before {
                idle_calls += 1;
                if idle_calls >= f.patience {
                    self.summary.lock().expect("summary").short += 1;
                    self.bar.suspend(|| {
                        crate::errln!(
                            "{tag}: {} API calls in a row brought no new image; stopping at {} of {}",
                            f.patience,
                            count_jpgs(&tag_dir),
                            f.count
                        )
                    });
                    break;
                }
            } else {
                idle_calls = 0;
            }
        }
        Ok(())
    }

    /// The items of one API answer: a JSON list, or the `list` (else `items`) of an object.
    fn api_items(&self, url: &str) -> Result<Vec<Value>> {
        let (result, _) = self.client.get(url, |b| {
            serde_json::from_slice::<Value>(b)
                .map(|_| ())
                .map_err(|e| FetchError::NotImage(format!("API answer is not JSON: {e}")))
        });
        let body = match result {
            Ok(b) => b,
            Err(e) => {
                bail!("{url}: {e}; stopping (what was saved is kept; run the same command again to continue)");
            }
        };
        Ok(match serde_json::from_slice(&body)? {
            Value::Array(a) => a,
            Value::Object(o) => o
                .get("list")
                .or(o.get("items"))
                .and_then(|v| v.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        })
    }

    /// The downloads (`(url, dest, log fields)`) of one API answer for `tag`: at most `wanted`
    /// into its folder, untagged items into `unknown`; items already on disk are logged as
    /// skipped, items tried before in this run and bad items are left out.
    fn plan(
        &mut self,
        tag: &str,
        items: &[Value],
        mut wanted: usize,
    ) -> Vec<(String, PathBuf, Vec<String>)> {
        let f = self.f;
        let mut batch = Vec::new();
        for v in items {
            let item = match ApiItem::parse(v) {
                Ok(i) => i,
                Err(e) => {
                    self.summary.lock().expect("summary").failed += 1;
                    self.bar
                        .suspend(|| crate::errln!("skipped an API item: {e:#}"));
                    continue;
                }
            };
            let url = item.iiif_url(&f.iiif_base, f.height);
            let fields = vec![
                item.id.clone(),
                item.pid.clone(),
                item.page.to_string(),
                item.region.clone(),
                item.tags.join(";"),
            ];
            if self.attempted.contains(&item.id) {
                // Tried earlier in this run (and failed, or went to another folder).
                continue;
            }
            if self.on_disk.contains(&item.id) {
                self.summary.lock().expect("summary").skipped += 1;
                let mut row: Vec<&str> = fields.iter().map(String::as_str).collect();
                row.extend([url.as_str(), "skipped: already on disk"]);
                self.log.row(&row);
                continue;
            }
            let folder = if item.tags.is_empty() { "unknown" } else { tag };
            if folder == tag && wanted == 0 {
                continue;
            }
            if folder == tag {
                wanted -= 1;
            }
            self.attempted.insert(item.id.clone());
            let dest = match dest_path(&f.out, folder, &format!("{}.jpg", item.id)) {
                Ok(d) => d,
                Err(e) => {
                    self.summary.lock().expect("summary").failed += 1;
                    self.bar
                        .suspend(|| crate::errln!("skipped API item {}: {e}", item.id));
                    continue;
                }
            };
            batch.push((url, dest, fields));
        }
        batch
    }
}

/// True for an http or https address, the only ones the client asks or follows.
fn is_web(url: &url::Url) -> bool {
    matches!(url.scheme(), "http" | "https")
}

/// An address the client may ask: http or https.
fn check_base(url: &str, what: &str) -> Result<()> {
    match url::Url::parse(url) {
        Ok(u) if is_web(&u) => Ok(()),
        _ => bail!("{what} '{url}' is not an http or https address"),
    }
}

/// Clears what a killed fetch left half-written in the label folders (a fetch running beside
/// this one keeps its own: their temporaries are locked while written).
fn remove_stale_downloads(out: &Path) {
    if let Ok(dirs) = std::fs::read_dir(out) {
        for d in dirs.flatten().filter(|d| d.path().is_dir()) {
            crate::fsutil::remove_stale_temporaries(&d.path(), Duration::ZERO);
        }
    }
}

/// Settings of `fetch --metadata`.
pub struct MetadataFetch {
    pub metadata: PathBuf,
    pub out: PathBuf,
    pub iiif_base: String,
    pub height: u32,
    pub limit: Option<usize>,
    pub labels: Vec<String>,
}

/// `fetch --metadata`: every row's image into `<out>/<label>/<file name>`.
pub fn fetch_metadata(client: &Client, f: &MetadataFetch) -> Result<FetchSummary> {
    check_base(&f.iiif_base, "--iiif-base")?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(&f.metadata)
        .with_context(|| format!("cannot read {}", f.metadata.display()))?;
    let log = Log::open(&f.out)?;
    remove_stale_downloads(&f.out);
    let summary = Mutex::new(FetchSummary::default());
    let mut jobs = Vec::new();
    for (line, record) in reader.records().enumerate() {
        let record =
            record.with_context(|| format!("{}: row {}", f.metadata.display(), line + 2))?;
        let (file, label, url) = match (record.get(0), record.get(1), record.get(5)) {
            (Some(a), Some(b), Some(c)) => (a.trim(), b.trim(), c.trim()),
            _ => bail!(
                "{}: row {} has fewer than 6 columns",
                f.metadata.display(),
                line + 2
            ),
        };
        if !f.labels.is_empty() && !f.labels.iter().any(|l| l == label) {
            continue;
        }
        if f.limit
            .is_some_and(|l| jobs.len() + summary.lock().expect("summary").skipped >= l)
        {
            break;
        }
        let checked = dest_path(&f.out, label, file).and_then(|dest| {
            let url = metadata_url(url, f.height, &f.iiif_base).map_err(|e| e.to_string())?;
            check_base(&url, "address").map_err(|e| e.to_string())?;
            Ok((dest, url))
        });
        let (dest, url) = match checked {
            Ok(x) => x,
            Err(e) => {
                summary.lock().expect("summary").failed += 1;
                crate::errln!("{}: row {}: skipped: {e}", f.metadata.display(), line + 2);
                continue;
            }
        };
        let fields = vec![
            file.to_string(),
            String::new(),
            String::new(),
            String::new(),
            label.to_string(),
        ];
        if dest.exists() {
            summary.lock().expect("summary").skipped += 1;
            let mut row: Vec<&str> = fields.iter().map(String::as_str).collect();
            row.extend([url.as_str(), "skipped: already on disk"]);
            log.row(&row);
            continue;
        }
        jobs.push((url, dest, fields));
    }
    let bar = progress::bar(jobs.len() as u64, "images");
    bar.set_prefix("fetch");
    download_all(client, &log, client.opts.jobs, jobs, &summary, &bar);
    bar.finish_and_clear();
    let mut s = *summary.lock().expect("summary");
    s.interrupted = progress::interrupted();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn iiif_url_follows_the_original_rule() {
        let item = ApiItem::parse(&json!({"id": "1017141_454_0", "pid": "1017141", "page": 454,
            "x": 15.0, "y": 20.1, "w": 28.5, "h": 66.7, "graphictags": [{"tagname": "graphic_graph"}]}))
        .unwrap();
        assert_eq!(
            item.iiif_url(DEFAULT_IIIF_BASE, 256),
            "https://www.dl.ndl.go.jp/api/iiif/1017141/R0000454/pct:15.0,20.1,28.5,66.7/,256/0/default.jpg"
        );
        assert_eq!(item.tags, ["graphic_graph"]);
        let item = ApiItem::parse(&json!({"id": 7, "pid": "2587246", "page": "3",
            "x": 0, "y": 12.25, "w": 100, "h": 33.333, "graphictags": []}))
        .unwrap();
        assert_eq!(item.id, "7");
        assert_eq!(
            item.iiif_url("http://127.0.0.1:9/iiif/", 128),
            "http://127.0.0.1:9/iiif/2587246/R0000003/pct:0,12.25,100,33.333/,128/0/default.jpg"
        );
        assert!(item.tags.is_empty());
        let item = ApiItem::parse(
            &json!({"id": "a", "pid": "1", "page": 1234567, "x": 1.5, "y": 2, "w": 3, "h": 4}),
        )
        .unwrap();
        assert!(item
            .iiif_url(DEFAULT_IIIF_BASE, 256)
            .contains("/R1234567/pct:1.5,2,3,4/"));
        assert!(ApiItem::parse(&json!({"id": "a", "pid": "1"})).is_err());
    }

    #[test]
    fn retry_waits_double_and_are_capped() {
        let ms = Duration::from_millis;
        assert_eq!(retry_wait(None, ms(100), 0), ms(100));
        assert_eq!(retry_wait(None, ms(100), 3), ms(800));
        assert_eq!(retry_wait(None, ms(1000), 40), MAX_WAIT);
        assert_eq!(retry_wait(Some(ms(2000)), ms(100), 0), ms(2000));
        let huge = Some(Duration::from_secs(999_999));
        assert_eq!(retry_wait(huge, ms(100), 0), MAX_WAIT);
    }

    #[test]
    fn names_from_outside_never_leave_the_output_folder() {
        let out = Path::new("/data/out");
        assert_eq!(
            dest_path(out, "stamp", "a_1.jpg").unwrap(),
            Path::new("/data/out/stamp/a_1.jpg")
        );
        for (folder, file) in [
            ("..", "x.jpg"),
            ("stamp", "../../../x.jpg"),
            ("stamp", "/tmp/x.jpg"),
            ("../../evil", "x.jpg"),
            ("stamp", ".hidden.jpg"),
            ("stamp", "a\\b.jpg"),
            ("", "x.jpg"),
            ("stamp", "x.jpg\0"),
        ] {
            assert!(dest_path(out, folder, file).is_err(), "{folder}/{file}");
        }
        let item = |id: &str, pid: &str, x: serde_json::Value| {
            ApiItem::parse(
                &json!({"id": id, "pid": pid, "page": 1, "x": x, "y": 2, "w": 3, "h": 4}),
            )
        };
        assert!(item("a", "1", json!(1.5)).is_ok());
        assert!(item("../../../x", "1", json!(1)).is_err());
        assert!(item("a", "/tmp/x", json!(1)).is_err());
        assert!(item("a", "1", json!("1/../../admin")).is_err());
        assert!(item("a", "1", json!("nan")).is_err());
    }

    #[test]
    fn api_and_metadata_urls() {
        assert_eq!(
            api_url(DEFAULT_API_BASE, "stamp", 10),
            "https://lab.ndl.go.jp/dl/api/illustration/randomwithfacet?size=10&f-graphictags.tagname=stamp"
        );
        let full = "https://www.dl.ndl.go.jp/api/iiif/1017141/R0000454/pct:15.0,20.1,28.5,66.7/full/0/default.jpg";
        assert_eq!(
            metadata_url(full, 256, DEFAULT_IIIF_BASE).unwrap(),
            "https://www.dl.ndl.go.jp/api/iiif/1017141/R0000454/pct:15.0,20.1,28.5,66.7/,256/0/default.jpg"
        );
        assert_eq!(
            metadata_url(full, 128, "http://127.0.0.1:8/x").unwrap(),
            "http://127.0.0.1:8/x/1017141/R0000454/pct:15.0,20.1,28.5,66.7/,128/0/default.jpg"
        );
    }
}
