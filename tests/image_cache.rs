//! The decoded-image cache on disk: the same pixels as decoding, reused by later loads, rebuilt
//! when damaged or when the dataset changes, and shared by concurrent loads.

use std::path::{Path, PathBuf};

use trainer::data::{dataset, disk_cache};

fn copy_sample(to: &Path) {
    let from = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasetpdm");
    for tag in ["stamp", "graphic_map"] {
        std::fs::create_dir_all(to.join(tag)).unwrap();
        for f in std::fs::read_dir(from.join(tag)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(tag).join(f.file_name().unwrap())).unwrap();
        }
    }
}

fn pixels(cache: &dataset::ImageCache) -> Vec<u8> {
    Vec::<u8>::try_from(cache.pixels.flatten(0, -1)).unwrap()
}

fn load(dir: &Path, data: &Path) -> (dataset::ImageCache, disk_cache::Provenance) {
    let (taxonomy, samples) = dataset::open(data, None).unwrap();
    disk_cache::load(dir, data, samples, &taxonomy, 32).unwrap()
}

fn pixel_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pixels"))
        .collect();
    v.sort();
    v
}

#[test]
fn decoded_once_then_mapped_and_rebuilt_when_damaged_or_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("cache"));
    copy_sample(&data);
    // A file that cannot be decoded is left out, on every load.
    std::fs::write(data.join("stamp/broken.jpg"), b"not a jpeg").unwrap();
    let (taxonomy, samples) = dataset::open(&data, None).unwrap();
    let direct = dataset::load_cache(&data, samples, &taxonomy, 32).unwrap();

    let (first, how) = load(&dir, &data);
    assert!(!how.reused);
    assert_eq!(pixels(&first), pixels(&direct));
    assert!(first.targets.equal(&direct.targets));
    let names = |c: &dataset::ImageCache| -> Vec<PathBuf> {
        c.samples.iter().map(|s| s.path.clone()).collect()
    };
    assert_eq!(names(&first), names(&direct));
    assert!(!names(&first).iter().any(|p| p.ends_with("broken.jpg")));

    let (second, how) = load(&dir, &data);
    assert!(how.reused);
    assert_eq!(pixels(&second), pixels(&direct));
    assert_eq!(names(&second), names(&direct));

    // A flipped byte: detected, decoded again, the same pixels.
    let file = &pixel_files(&dir)[0];
    let mut bytes = std::fs::read(file).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(file, &bytes).unwrap();
    let (third, how) = load(&dir, &data);
    assert!(!how.reused);
    assert_eq!(pixels(&third), pixels(&direct));
    // Cut short: the same.
    std::fs::write(file, &bytes[..1000]).unwrap();
    assert!(!load(&dir, &data).1.reused);
    assert!(load(&dir, &data).1.reused);

    // A changed dataset is another entry.
    std::fs::remove_file(data.join("stamp/broken.jpg")).unwrap();
    let (fourth, how) = load(&dir, &data);
    assert!(!how.reused);
    assert_eq!(fourth.samples.len(), direct.samples.len());
    assert_eq!(pixel_files(&dir).len(), 2);
}

#[test]
fn concurrent_loads_decode_once_and_see_the_same_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("cache"));
    copy_sample(&data);
    let results: Vec<(Vec<u8>, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let (c, how) = load(&dir, &data);
                    (pixels(&c), how.reused)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|(_, reused)| !reused).count(), 1);
    assert!(results.iter().all(|(p, _)| *p == results[0].0));
    assert_eq!(pixel_files(&dir).len(), 1);
}
