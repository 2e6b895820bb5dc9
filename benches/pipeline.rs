//! `cargo bench`: CPU throughput of the input pipeline (decode + resize, augment) per core and of
//! training steps at batch 48. Prints a table.

use std::path::PathBuf;
use std::time::Instant;

use rand::SeedableRng;
use tch::nn::ModuleT;
use tch::{nn, Device, Kind, Reduction, Tensor};
use trainer::data::augment::{augment, Augment};
use trainer::data::decode::load_resized;
use trainer::model::efficientnet::{Tagger, TaggerConfig};
use trainer::model::{Engine, LoadedModel};
use trainer::train::adam::Adam;

fn images() -> Vec<PathBuf> {
    let shared = std::env::var_os("TRAINER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let root = shared.join("data/ndl-sample");
    let mut out = Vec::new();
    for sub in ["books", "labelled"] {
        for dir in std::fs::read_dir(root.join(sub)).expect("sample data") {
            for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn main() {
    // As the binary does at start-up.
    trainer::runtime::tune_allocator();
    let threads = tch::get_num_threads();
    let paths = images();
    let mut rows: Vec<(String, String, f64)> = Vec::new();

    // Decode + resize on one core.
    let reps = 5;
    let t0 = Instant::now();
    let mut cache = Vec::new();
    for _ in 0..reps {
        cache.clear();
        for p in &paths {
            cache.push(load_resized(p, 224).expect("decodes"));
        }
    }
    let decode = (reps * paths.len()) as f64 / t0.elapsed().as_secs_f64();
    rows.push((
        "decode + resize to 224 (libjpeg-turbo + OpenCV-exact)".into(),
        "1".into(),
        decode,
    ));

    // Augment (the original list) on one core, batches of 48.
    tch::set_num_threads(1);
    let n = 48.min(cache.len());
    let flat: Vec<u8> = cache[..n].concat();
    let batch = Tensor::from_slice(&flat).view([n as i64, 224, 224, 3]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let _ = augment(&batch, Augment::Original, &mut rng);
    let iters = 10;
    let t0 = Instant::now();
    for _ in 0..iters {
        let _ = augment(&batch, Augment::Original, &mut rng);
    }
    let aug = (iters * n) as f64 / t0.elapsed().as_secs_f64();
    rows.push(("augment, original list, batch 48".into(), "1".into(), aug));
    rows.push((
        "input pipeline (decode + augment) per core".into(),
        "1".into(),
        1.0 / (1.0 / decode + 1.0 / aug),
    ));
    tch::set_num_threads(threads);

    // Inference forward passes as `infer` runs them, batch 64.
    let keras = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/keras-oracle/ndl_b0_model.hdf5");
    let keras = std::env::var_os("TRAINER_SHARED")
        .map(|s| PathBuf::from(s).join("fixtures/keras-oracle/ndl_b0_model.hdf5"))
        .unwrap_or(keras);
    let n = 64.min(cache.len());
    let pixels: Vec<u8> = cache[..n].concat();
    for engine in [Engine::Onnxruntime, Engine::Torch] {
        let mut model = LoadedModel::load(&keras, Device::Cpu).expect("the oracle model");
        if let Err(e) = model.choose_engine(engine) {
            eprintln!("{engine:?}: {e:#}");
            continue;
        }
        let _ = model.predict(&pixels, n);
        let t0 = Instant::now();
        for _ in 0..3 {
            let _ = model.predict(&pixels, n);
        }
        let fwd = (3 * n) as f64 / t0.elapsed().as_secs_f64();
        rows.push((
            format!("inference forward, batch {n}, {}", model.engine_name()),
            threads.to_string(),
            fwd,
        ));
    }

    // Training steps at batch 48, 224x224, fp32 on CPU.
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Tagger::new(&vs.root(), TaggerConfig::default());
    let mut opt = Adam::new(&vs, 1e-4);
    let x = Tensor::rand([48, 3, 224, 224], (Kind::Float, Device::Cpu));
    let y = Tensor::rand([48, 11], (Kind::Float, Device::Cpu)).round();
    let step = |opt: &mut Adam| {
        let loss = net
            .forward_t(&x, true)
            .binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        opt.step();
    };
    step(&mut opt);
    let steps = 3;
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut opt);
    }
    let train = (steps * 48) as f64 / t0.elapsed().as_secs_f64();
    rows.push((
        "training step, batch 48, 224x224, fp32".into(),
        threads.to_string(),
        train,
    ));

    println!(
        "\n| {:<55} | {:>7} | {:>9} |",
        "what (CPU)", "threads", "images/s"
    );
    println!("|{:-<57}|{:-<9}|{:-<11}|", "", "", "");
    for (what, t, v) in rows {
        println!("| {what:<55} | {t:>7} | {v:>9.1} |");
    }
}
