//! Hostile Keras HDF5 files and checkpoints, generated here: links and storage that leave the
//! file, datasets and attributes claiming huge sizes, decompression bombs, checkpoint shapes whose
//! product overflows. Each is refused by `infer` with a message naming the file and the tensor,
//! run under a memory limit (an attempt to allocate the claimed size fails the run) and a time
//! limit (a read from a pipe fails the test instead of hanging it).

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trainer::model::keras;

/// Address space a refused run may use: enough for libtorch and the real model, far below the
/// sizes the hostile files claim.
const MEMORY_LIMIT: u64 = 4 << 30;
/// Long enough for any refusal; a run still going then is reading something it must not.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// The tensor most cases replace, and its shape.
const STEM: &str = "stem_conv/stem_conv/kernel:0";
const STEM_SHAPE: [usize; 4] = [3, 3, 3, 32];
/// The largest B0 tensor (1.6 MB), for the bombs that fit its chunk.
const TOP: &str = "top_conv/top_conv/kernel:0";
const TOP_SHAPE: [usize; 4] = [1, 1, 320, 1280];

struct Run {
    ok: bool,
    code: Option<i32>,
    stderr: String,
}

/// `trainer infer` on one image with `weights`, under [`MEMORY_LIMIT`] and [`TIME_LIMIT`].
fn infer(dir: &Path, weights: &Path) -> Run {
    let book = dir.join("in/book");
    std::fs::create_dir_all(&book).unwrap();
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasetpdm/stamp");
    let first = std::fs::read_dir(image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    std::fs::copy(first, book.join("a.jpg")).unwrap();
    let log = dir.join(format!(
        "{}.stderr",
        weights.file_name().unwrap().to_string_lossy()
    ));
    let mut cmd = common::trainer();
    cmd.current_dir(dir)
        .args(["infer", "--device", "cpu", "--weights"])
        .arg(weights)
        .arg("--input")
        .arg(dir.join("in"))
        .args(["--output", "out", "--overwrite"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: MEMORY_LIMIT,
                rlim_max: MEMORY_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIME_LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "{}: still running after {TIME_LIMIT:?} (reading from a pipe?)",
                weights.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        ok: status.success(),
        code: status.code(),
        stderr: std::fs::read_to_string(&log).unwrap(),
    }
}

/// The run failed cleanly (exit code 1, no panic, no failed allocation) with a message naming
/// the file, the tensor and `reason`.
fn assert_refused(run: &Run, file: &Path, tensor: &str, reason: &str) {
    let err = &run.stderr;
    assert!(!run.ok && run.code == Some(1), "{:?}: {err}", run.code);
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{err}"
    );
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(err.contains(&*name), "the file is not named: {err}");
    assert!(
        err.contains(tensor),
        "the tensor {tensor} is not named: {err}"
    );
    assert!(err.contains(reason), "expected '{reason}': {err}");
}

/// A copy of the weights-only oracle file in `dir`, edited with `edit` (given the file).
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&hdf5::File)) -> PathBuf {
    let path = dir.join(name);
    common::write_hdf5_for_child(&path, |scratch| {
        std::fs::copy(common::oracle().join("ndl_b0_weights.h5"), scratch).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = hdf5::File::open_rw(scratch).unwrap();
        edit(&file);
    });
    path
}

/// The group holding `tensor` and the tensor's own name in it.
fn parent(tensor: &str) -> (String, String) {
    let (group, name) = tensor.rsplit_once('/').unwrap();
    (format!("/{group}"), name.to_string())
}

/// Replaces `tensor` of the file by what `make` creates in its group under its name.
fn replace(file: &hdf5::File, tensor: &str, make: impl FnOnce(&hdf5::Group, &str)) {
    let (group, name) = parent(tensor);
    let g = file.group(&group).unwrap();
    g.unlink(&name).unwrap();
    make(&g, &name);
}

/// Another HDF5 file holding a tensor of the stem's shape at `/x`.
fn other_file(dir: &Path) -> PathBuf {
    let path = dir.join("other.h5");
    common::write_hdf5_for_child(&path, |scratch| {
        hdf5::File::create(scratch)
            .unwrap()
            .new_dataset::<f32>()
            .shape(STEM_SHAPE)
            .create("x")
            .unwrap()
            .write_raw(&vec![7.0f32; 864])
            .unwrap();
    });
    path
}

fn mkfifo(path: &Path) {
    assert!(std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success());
}

#[test]
fn the_real_file_loads_under_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), "plain.h5", |_| {});
    let run = infer(dir.path(), &path);
    assert!(run.ok, "{}", run.stderr);
}

#[test]
fn links_leaving_the_file_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let other = other_file(dir.path());
    let other_name = other.to_str().unwrap().to_string();
    let o = other_name.clone();
    let external = edited(dir.path(), "external_link.h5", |f| {
        replace(f, STEM, |g, name| g.link_external(&o, "/x", name).unwrap())
    });
    let o = other_name.clone();
    let soft_out = edited(dir.path(), "soft_out.h5", |f| {
        f.link_external(&o, "/", "elsewhere").unwrap();
        replace(f, STEM, |g, name| {
            g.link_soft("/elsewhere/x", name).unwrap()
        })
    });
    let dangling = edited(dir.path(), "dangling.h5", |f| {
        replace(f, STEM, |g, name| g.link_soft("/nowhere/x", name).unwrap())
    });
    let looping = edited(dir.path(), "looping.h5", |f| {
        f.link_soft("/loop_b", "loop_a").unwrap();
        f.link_soft("/loop_a", "loop_b").unwrap();
        replace(f, STEM, |g, name| g.link_soft("/loop_a", name).unwrap())
    });
    let o = other_name.clone();
    let layer = edited(dir.path(), "layer_link.h5", |f| {
        f.unlink("stem_conv").unwrap();
        f.link_external(&o, "/", "stem_conv").unwrap();
    });
    for (path, reason) in [
        (&external, "an external link to another file"),
        (&soft_out, "an external link to another file"),
        (&dangling, "a soft link that points at nothing"),
        (&looping, "soft links loop"),
    ] {
        assert_refused(&infer(dir.path(), path), path, STEM, reason);
    }
    let run = infer(dir.path(), &layer);
    assert_refused(
        &run,
        &layer,
        "layer stem_conv",
        "an external link to another file",
    );

    // A soft link that stays in the file is an ordinary way to name a tensor: it loads.
    let inside = edited(dir.path(), "soft_inside.h5", |f| {
        let (group, name) = parent(STEM);
        f.group(&group).unwrap().relink(&name, "/moved").unwrap();
        f.group(&group).unwrap().link_soft("/moved", &name).unwrap();
    });
    let run = infer(dir.path(), &inside);
    assert!(run.ok, "{}", run.stderr);
}

#[test]
fn storage_outside_the_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("passwd");
    std::fs::write(&outside, vec![b'x'; 864 * 4]).unwrap();
    let fifo = dir.path().join("pipe");
    mkfifo(&fifo);
    let mut cases = Vec::new();
    for (name, target) in [
        ("ext_file.h5", outside.to_str().unwrap()),
        ("ext_zero.h5", "/dev/zero"),
        ("ext_fifo.h5", fifo.to_str().unwrap()),
    ] {
        let target = target.to_string();
        let path = edited(dir.path(), name, |f| {
            replace(f, STEM, |g, n| {
                g.new_dataset::<f32>()
                    .external(&target, 0, 864 * 4)
                    .shape(STEM_SHAPE)
                    .create(n)
                    .unwrap();
            })
        });
        cases.push((path, format!("external storage in {target}")));
    }
    let other = other_file(dir.path());
    let o = other.to_str().unwrap().to_string();
    let virtual_ds = edited(dir.path(), "virtual.h5", |f| {
        replace(f, STEM, |g, n| {
            g.new_dataset::<f32>()
                .virtual_map(&o, "/x", STEM_SHAPE, .., STEM_SHAPE, ..)
                .shape(STEM_SHAPE)
                .create(n)
                .unwrap();
        })
    });
    cases.push((virtual_ds, "a virtual dataset".to_string()));
    for (path, reason) in &cases {
        assert_refused(&infer(dir.path(), path), path, STEM, reason);
    }
}

#[test]
fn huge_shapes_in_small_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    // 64 GiB claimed (chunked, no chunk written): a file of a few megabytes.
    let huge = edited(dir.path(), "huge.h5", |f| {
        replace(f, STEM, |g, n| {
            g.new_dataset::<f32>()
                .chunk([64, 64, 4])
                .shape([1 << 16, 1 << 16, 4])
                .create(n)
                .unwrap();
        })
    });
    assert!(std::fs::metadata(&huge).unwrap().len() < 50 << 20);
    let run = infer(dir.path(), &huge);
    assert_refused(&run, &huge, STEM, "has shape [65536, 65536, 4]");
    // Without a model to compare with, the reader's own bound refuses it.
    let err = keras::read(&huge).unwrap_err().to_string();
    assert!(
        err.contains(STEM) && err.contains("larger than any tensor"),
        "{err}"
    );

    // Integers where the model has floats.
    let ints = edited(dir.path(), "ints.h5", |f| {
        replace(f, STEM, |g, n| {
            g.new_dataset::<i64>().shape(STEM_SHAPE).create(n).unwrap();
        })
    });
    assert_refused(
        &infer(dir.path(), &ints),
        &ints,
        STEM,
        "not 32- or 64-bit floats",
    );
}

/// A zlib stream of `segments` x 16 MiB of zeros, built from one compressed segment repeated
/// (each ends on a flush, so they join), with the right checksum: megabytes that inflate to
/// gigabytes, made in a fraction of a second.
fn zlib_zeros(segments: usize) -> Vec<u8> {
    const SEGMENT: usize = 16 << 20;
    let zeros = vec![0u8; SEGMENT];
    let mut c = flate2::Compress::new(flate2::Compression::best(), true);
    let mut part = |flush| {
        let mut buf = Vec::with_capacity(1 << 20);
        let before = c.total_in();
        c.compress_vec(&zeros, &mut buf, flush).unwrap();
        assert_eq!((c.total_in() - before) as usize, SEGMENT);
        buf
    };
    let first = part(flate2::FlushCompress::Sync);
    let second = part(flate2::FlushCompress::Sync);
    let third = part(flate2::FlushCompress::Sync);
    assert_eq!(second, third, "the compressed segments repeat");
    let mut out = first;
    for _ in 1..segments {
        out.extend_from_slice(&second);
    }
    // An empty final block, then Adler-32 of n zeros: a = 1, b = n mod 65521.
    out.extend_from_slice(&[0x03, 0x00]);
    let b = ((segments * SEGMENT) % 65521) as u32;
    out.extend_from_slice(&((b << 16) | 1).to_be_bytes());
    out
}

/// Replaces `tensor` by a deflate-compressed dataset of its shape in one chunk, whose stored
/// chunk is `chunk` (written raw, as HDF5 would store it).
fn with_raw_chunk(file: &hdf5::File, tensor: &str, shape: [usize; 4], chunk: &[u8]) {
    replace(file, tensor, |g, n| {
        let ds = g
            .new_dataset::<f32>()
            .chunk(shape)
            .deflate(4)
            .shape(shape)
            .create(n)
            .unwrap();
        let offset = [0u64; 4];
        let rc = unsafe {
            hdf5_sys::h5d::H5Dwrite_chunk(
                ds.id(),
                hdf5_sys::h5p::H5P_DEFAULT,
                0,
                offset.as_ptr(),
                chunk.len(),
                chunk.as_ptr().cast(),
            )
        };
        assert!(rc >= 0, "H5Dwrite_chunk");
    });
}

#[test]
fn decompression_bombs_are_refused_within_the_chunk_size() {
    let bomb = zlib_zeros(95);
    // The stream is valid: its first 64 MiB inflate to zeros.
    let mut head = Vec::new();
    use std::io::Read;
    flate2::read::ZlibDecoder::new(&bomb[..])
        .take(64 << 20)
        .read_to_end(&mut head)
        .unwrap();
    assert!(head.len() == 64 << 20 && head.iter().all(|&b| b == 0));
    assert!(bomb.len() < 1_600_000, "{} bytes", bomb.len());

    let dir = tempfile::tempdir().unwrap();
    // 1.5 MB stored in the largest tensor's 1.6 MB chunk, inflating to 1.5 GiB.
    let fits = edited(dir.path(), "bomb_top.h5", |f| {
        with_raw_chunk(f, TOP, TOP_SHAPE, &bomb)
    });
    assert_refused(&infer(dir.path(), &fits), &fits, TOP, "decompression bomb");
    // The same stream in a 3.5 KB chunk: more stored than the chunk can need.
    let big = edited(dir.path(), "bomb_stem.h5", |f| {
        with_raw_chunk(f, STEM, STEM_SHAPE, &bomb)
    });
    assert_refused(
        &infer(dir.path(), &big),
        &big,
        STEM,
        "more than its 3456 bytes",
    );
    // Filters this reader does not decode are refused by name.
    let nbit = edited(dir.path(), "nbit.h5", |f| {
        replace(f, STEM, |g, n| {
            g.new_dataset::<f32>()
                .chunk(STEM_SHAPE)
                .nbit()
                .shape(STEM_SHAPE)
                .create(n)
                .unwrap()
                .write_raw(&vec![0.5f32; 864])
                .unwrap();
        })
    });
    let run = infer(dir.path(), &nbit);
    assert_refused(
        &run,
        &nbit,
        STEM,
        "only deflate (gzip), shuffle and fletcher32",
    );
}

#[test]
fn compressed_tensors_read_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let original = keras::read(&common::oracle().join("ndl_b0_weights.h5")).unwrap();
    let top = original.tensors.iter().find(|t| t.name == TOP).unwrap();
    let values = top.data.clone();
    // Edge chunks on both chunked dimensions, shuffle then deflate as h5py writes them.
    let path = edited(dir.path(), "gzip.h5", |f| {
        replace(f, TOP, |g, n| {
            g.new_dataset::<f32>()
                .chunk([1, 1, 96, 500])
                .shuffle()
                .deflate(6)
                .shape(TOP_SHAPE)
                .create(n)
                .unwrap()
                .write_raw(&values)
                .unwrap();
        })
    });
    let read = keras::read(&path).unwrap();
    let again = read.tensors.iter().find(|t| t.name == TOP).unwrap();
    assert_eq!(again.shape, TOP_SHAPE);
    assert!(again
        .data
        .iter()
        .zip(&top.data)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let run = infer(dir.path(), &path);
    assert!(run.ok, "{}", run.stderr);

    // With HDF5's checksum filter: verified, then left out; a damaged chunk is refused.
    let stem: Vec<f32> = (0..864).map(|i| i as f32 * 0.25 - 7.0).collect();
    let checked = edited(dir.path(), "fletcher.h5", |f| {
        replace(f, STEM, |g, n| {
            g.new_dataset::<f32>()
                .chunk([3, 3, 3, 20])
                .shuffle()
                .deflate(6)
                .fletcher32()
                .shape(STEM_SHAPE)
                .create(n)
                .unwrap()
                .write_raw(&stem)
                .unwrap();
        })
    });
    let read = keras::read(&checked).unwrap();
    assert_eq!(
        read.tensors.iter().find(|t| t.name == STEM).unwrap().data,
        stem
    );
    let mut bytes = std::fs::read(&checked).unwrap();
    let file = hdf5::File::open(&checked).unwrap();
    let info = file
        .dataset(&format!("/{STEM}"))
        .unwrap()
        .chunk_info(0)
        .unwrap();
    drop(file);
    bytes[info.addr as usize + 5] ^= 0x40;
    let damaged = dir.path().join("damaged.h5");
    std::fs::write(&damaged, bytes).unwrap();
    let err = keras::read(&damaged).unwrap_err().to_string();
    assert!(
        err.contains(STEM) && err.contains("checksum does not match"),
        "{err}"
    );
}

/// Every tensor of the real Keras files reads as HDF5 itself reads it, bit for bit.
#[test]
fn the_real_files_read_as_before() {
    let shared = common::shared().join("fixtures");
    let files = [
        "keras-oracle/ndl_b0_model.hdf5",
        "keras-oracle/ndl_b0_weights.h5",
        "keras-oracle/b0_notop_weights.h5",
        "keras-oracle-b1/ndl_b1_weights.h5",
        "keras-oracle-b1/b1_notop_weights.h5",
    ];
    for name in files {
        let path = shared.join(name);
        if !path.exists() {
            continue;
        }
        let weights = keras::read(&path).unwrap();
        let file = hdf5::File::open(&path).unwrap();
        let root = match weights.layout {
            keras::KerasLayout::FullModel => "model_weights/",
            keras::KerasLayout::WeightsOnly => "",
        };
        for t in &weights.tensors {
            let ds = file.dataset(&format!("{root}{}", t.name)).unwrap();
            assert_eq!(ds.shape(), t.shape, "{name}: {}", t.name);
            let direct = ds.read_raw::<f32>().unwrap();
            let same = direct
                .iter()
                .zip(&t.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && direct.len() == t.data.len(), "{name}: {}", t.name);
        }
    }
}

#[test]
fn huge_name_attributes_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    // More names than fit an object header: a new file whose attributes may be stored densely.
    let many = dir.path().join("many_layers.h5");
    common::write_hdf5_for_child(&many, |scratch| {
        let f = hdf5::File::with_options()
            .with_fapl(|p| p.libver_latest())
            .create(scratch)
            .unwrap();
        let names: Vec<hdf5::types::VarLenAscii> = (0..10_001)
            .map(|i| hdf5::types::VarLenAscii::from_ascii(&format!("l{i}")).unwrap())
            .collect();
        f.new_attr::<hdf5::types::VarLenAscii>()
            .shape(names.len())
            .create("layer_names")
            .unwrap()
            .write_raw(&names)
            .unwrap();
    });
    let run = infer(dir.path(), &many);
    assert_refused(&run, &many, "layer_names", "claims 10001 names");

    // 10,000 layers naming one group of 20 weights: a 200 KB file listing 200,000 tensors.
    let shared = dir.path().join("shared_group.h5");
    common::write_hdf5_for_child(&shared, |scratch| {
        let f = hdf5::File::with_options()
            .with_fapl(|p| p.libver_latest())
            .create(scratch)
            .unwrap();
        let ascii = |s: &str| hdf5::types::VarLenAscii::from_ascii(s).unwrap();
        let g = f.create_group("g").unwrap();
        g.new_dataset::<f32>().shape(1).create("x").unwrap();
        let weights = vec![ascii("x"); 20];
        let attr = g.new_attr::<hdf5::types::VarLenAscii>().shape(20);
        attr.create("weight_names")
            .unwrap()
            .write_raw(&weights)
            .unwrap();
        let layers = vec![ascii("g"); 10_000];
        let attr = f.new_attr::<hdf5::types::VarLenAscii>().shape(10_000);
        attr.create("layer_names")
            .unwrap()
            .write_raw(&layers)
            .unwrap();
    });
    let err = keras::read(&shared).unwrap_err().to_string();
    assert!(
        err.contains("shared_group.h5") && err.contains("more than 100000 tensors"),
        "{err}"
    );

    let wide = edited(dir.path(), "wide_names.h5", |f| {
        let g = f.group("stem_conv").unwrap();
        g.delete_attr("weight_names").unwrap();
        g.new_attr::<hdf5::types::FixedAscii<4096>>()
            .shape(1)
            .create("weight_names")
            .unwrap();
    });
    let run = infer(dir.path(), &wide);
    assert_refused(&run, &wide, "layer stem_conv", "names of 4096 bytes");

    let long = edited(dir.path(), "long_name.h5", |f| {
        let g = f.group("stem_conv").unwrap();
        g.delete_attr("weight_names").unwrap();
        let name = hdf5::types::VarLenAscii::from_ascii(&"k".repeat(5000)).unwrap();
        g.new_attr::<hdf5::types::VarLenAscii>()
            .shape(1)
            .create("weight_names")
            .unwrap()
            .write_raw(&[name])
            .unwrap();
    });
    let run = infer(dir.path(), &long);
    assert_refused(&run, &long, "layer stem_conv", "a name of 5000 bytes");
}

/// SHA-256 of the tensors as the checkpoint records it: name, shape and bytes, in name order.
fn tensors_sha256(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> String {
    use sha2::Digest;
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    let mut h = sha2::Sha256::new();
    for name in names {
        let info = &header[name];
        let shape: Vec<u64> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        let offsets = info["data_offsets"].as_array().unwrap();
        let (s, e) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in &shape {
            h.update(d.to_le_bytes());
        }
        h.update(((e - s) as u64).to_le_bytes());
        h.update(&data[s..e]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A checkpoint of a fresh tagger with one more, empty tensor `model.extra` of `shape` and the
/// checksum recomputed, as a tester editing the file would.
fn checkpoint_with_shape(path: &Path, shape: &[u64]) {
    use tch::{nn, Device};
    use trainer::model::checkpoint;
    let taxonomy = trainer::data::taxonomy::Taxonomy::ndl();
    let vs = nn::VarStore::new(Device::Cpu);
    let config = trainer::model::efficientnet::TaggerConfig {
        num_classes: taxonomy.labels.len() as i64,
        ..Default::default()
    };
    let _net = trainer::model::efficientnet::Tagger::new(&vs.root(), config);
    let meta = common::checkpoint_meta(taxonomy, 64);
    checkpoint::save(path, &meta, &vs, &[]).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let end = data.len();
    header.insert(
        "model.extra".into(),
        serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [end, end]}),
    );
    let sum = tensors_sha256(&header, data);
    let meta_key = header["__metadata__"]["trainer"].as_str().unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(meta_key).unwrap();
    meta["tensors_sha256"] = serde_json::json!(sum);
    header["__metadata__"]["trainer"] = serde_json::json!(meta.to_string());
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = std::fs::File::create(path).unwrap();
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&json).unwrap();
    out.write_all(data).unwrap();
}

#[test]
fn checkpoint_shapes_that_overflow_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.ckpt");
    checkpoint_with_shape(&control, &[0]);
    let err = trainer::model::checkpoint::Checkpoint::read(&control).err();
    assert!(err.is_none(), "an empty extra tensor reads: {err:?}");
    for (name, shape) in [
        ("zero_first", vec![0, 1u64 << 63]),
        ("zero_last", vec![u64::MAX, 0]),
        ("zero_middle", vec![1 << 32, 0, 1 << 32]),
        ("wide", vec![0, 1 << 40]),
    ] {
        let path = dir.path().join(format!("{name}.ckpt"));
        checkpoint_with_shape(&path, &shape);
        let run = infer(dir.path(), &path);
        assert_refused(
            &run,
            &path,
            "model.extra",
            "larger than any checkpoint holds",
        );
        let err = trainer::model::checkpoint::Checkpoint::read(&path).err();
        assert!(format!("{err:?}").contains("model.extra"), "{err:?}");
    }
}

#[test]
fn checkpoint_headers_and_special_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("header.ckpt");
    checkpoint_with_shape(&path, &[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    for len in [u64::MAX, u64::MAX - 7, 1 << 40] {
        bytes[..8].copy_from_slice(&len.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = trainer::model::checkpoint::Checkpoint::read(&path).err();
        assert!(format!("{err:?}").contains("header.ckpt"), "{len}: {err:?}");
    }
    let fifo = dir.path().join("pipe.ckpt");
    mkfifo(&fifo);
    let err = trainer::model::checkpoint::Checkpoint::read(&fifo).err();
    assert!(format!("{err:?}").contains("not a regular file"), "{err:?}");
}
