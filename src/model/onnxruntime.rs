//! The CPU inference engine: the tagger's ONNX graph (`onnx::export`, built in memory from the
//! loaded weights) run by ONNX Runtime, loaded at run time from the `onnxruntime` Python wheel
//! that scripts/setup installs beside torch. On this model its CPU kernels (convolutions with the
//! bias and swish fused, blocked memory layouts) are faster than libtorch's, with the same
//! outputs to float rounding; `infer` and `eval` use it on CPU in fp32 unless told otherwise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::Session;
use ort::value::TensorRef;

/// The shared library the build found in the wheel; `ORT_DYLIB_PATH` overrides it.
const BUILT_WITH: Option<&str> = option_env!("TRAINER_ORT_DYLIB");

/// Images per run of a session: small runs keep the activations in the CPU's caches (measured
/// on 2 cores, one session per core: 2 to 4 images per run took 3.6-3.9 s for 480 images, 8
/// took 4.0-4.8 s, 16 took 5.2-5.3 s).
const CHUNK: usize = 4;

/// Where the ONNX Runtime library is looked for.
pub fn library_path() -> Option<PathBuf> {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => BUILT_WITH.map(PathBuf::from),
    }
}

/// Loads the library once per process; the error says which file and why.
fn environment() -> Result<&'static ort::environment::Environment, String> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().ok_or_else(|| {
            "no ONNX Runtime library is known: this trainer was built without the onnxruntime wheel (scripts/setup installs it) and ORT_DYLIB_PATH is not set".to_string()
        })?;
        if !path.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist (run scripts/setup, or set ORT_DYLIB_PATH)",
                path.display()
            ));
        }
        ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("trainer")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The ONNX Runtime library in use (its version is in the file name), or why it cannot be used
/// (for `trainer doctor`).
pub fn describe() -> Result<String, String> {
    environment()?;
    let path = library_path().unwrap_or_default();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok(match name.split_once(".so.") {
        Some((_, version)) => format!("{version} ({})", path.display()),
        None => path.display().to_string(),
    })
}

/// Sessions over the tagger's graph: uint8 BGR images `[N, S, S, 3]` in, probabilities out.
/// Each worker thread runs its own session on its own small chunks of the batch, one or a few
/// intra-op threads each: with as many workers as cores, the cores do not wait for each other
/// after each of the graph's 251 operations (measured 10-20% faster than one session on all cores).
pub struct Engine {
    sessions: Vec<Mutex<Session>>,
    labels: usize,
    image_size: usize,
}

/// At most this many sessions (each holds its own copy of the weights and of one chunk's
/// activations, about 100 MB); more cores go to intra-op threads.
const MAX_WORKERS: usize = 8;

/// Sessions and intra-op threads per session for `threads` cores: a session per core up to
/// `MAX_WORKERS`, then as few threads per session as keep the sessions at most `MAX_WORKERS`.
fn split_threads(threads: usize) -> (usize, usize) {
    let threads = threads.max(1);
    let per_worker = threads.div_ceil(MAX_WORKERS);
    (threads / per_worker, per_worker)
}

fn build_session(
    env: &ort::environment::Environment,
    model: &[u8],
    threads: usize,
    packed: &PrepackedWeights,
) -> Result<Session> {
    let fail = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow!("{e}");
    Session::builder(env)
        .map_err(|e| anyhow!("{e}"))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(fail)?
        .with_intra_threads(threads)
        .map_err(fail)?
        .with_inter_threads(1)
        .map_err(fail)?
        // Idle threads sleep instead of spinning, leaving the cores to the image decoders.
        .with_intra_op_spinning(false)
        .map_err(fail)?
        // The weights in the kernels' layouts, once for all the sessions.
        .with_prepacked_weights(packed)
        .map_err(fail)?
        .commit_from_memory(model)
        .map_err(|e| anyhow!("{e}"))
        .context("ONNX Runtime cannot build a session for the model")
}

impl Engine {
    /// Builds the sessions from the ONNX model bytes, for `threads` cores in all.
    pub fn new(model: &[u8], labels: usize, image_size: usize, threads: usize) -> Result<Self> {
        let env = environment().map_err(|e| anyhow!(e))?;
        let (workers, per_worker) = split_threads(threads);
        let packed = PrepackedWeights::new();
        let sessions = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| scope.spawn(|| build_session(env, model, per_worker, &packed)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow!("building an ONNX Runtime session failed"))?
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Engine {
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            labels,
            image_size,
        })
    }

    /// Probabilities (`n * labels`, row-major) of `n` images of `size * size * 3` BGR bytes.
    pub fn predict(&self, pixels: &[u8], n: usize) -> Result<Vec<f32>> {
        let per_image = self.image_size * self.image_size * 3;
        if pixels.len() != n * per_image {
            bail!("{} bytes for {n} images of {per_image} bytes", pixels.len());
        }
        let chunks: Vec<&[u8]> = pixels.chunks(CHUNK * per_image).collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let mut done: Vec<(usize, Result<Vec<f32>>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .sessions
                .iter()
                .take(chunks.len())
                .map(|session| {
                    let (next, failed, chunks) = (&next, &failed, &chunks);
                    scope.spawn(move || {
                        let mut done = Vec::new();
                        while !failed.load(Ordering::Relaxed) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(chunk) = chunks.get(i) else { break };
                            let probs = self.run_chunk(session, chunk, per_image);
                            failed.fetch_or(probs.is_err(), Ordering::Relaxed);
                            done.push((i, probs));
                        }
                        done
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        done.sort_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(n * self.labels);
        for (_, probs) in done {
            out.extend_from_slice(&probs?);
        }
        if out.len() != n * self.labels {
            bail!(
                "ONNX Runtime gave {} probabilities for {n} images of {} labels",
                out.len(),
                self.labels
            );
        }
        Ok(out)
    }

    /// Runs one chunk of whole images through one session.
    fn run_chunk(
        &self,
        session: &Mutex<Session>,
        chunk: &[u8],
        per_image: usize,
    ) -> Result<Vec<f32>> {
        let mut session = session
            .lock()
            .map_err(|_| anyhow!("an ONNX Runtime session failed in another thread"))?;
        let shape = [
            (chunk.len() / per_image) as i64,
            self.image_size as i64,
            self.image_size as i64,
            3,
        ];
        let input = TensorRef::from_array_view((shape, chunk))?;
        let outputs = session.run(ort::inputs!["images" => input])?;
        let (_, probs) = outputs["probabilities"].try_extract_tensor::<f32>()?;
        Ok(probs.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_split_into_at_most_eight_sessions_without_oversubscribing() {
        assert_eq!(split_threads(0), (1, 1));
        assert_eq!(split_threads(2), (2, 1));
        assert_eq!(split_threads(8), (8, 1));
        assert_eq!(split_threads(12), (6, 2));
        assert_eq!(split_threads(16), (8, 2));
        assert_eq!(split_threads(9), (4, 2));
        for t in 1..200 {
            let (w, p) = split_threads(t);
            assert!(
                (1..=MAX_WORKERS).contains(&w) && w * p <= t,
                "{t}: {w} x {p}"
            );
        }
    }
}
