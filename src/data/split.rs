//! The train/validation split: sorted paths, shuffled with Python's `random.Random(seed).shuffle`
//! (Mersenne Twister, the same on every machine), the first `val_fraction` is validation.

/// Python's `random.Random` core: MT19937 seeded with `init_by_array([seed])`, as
/// `random.seed(int)` does.
pub struct PyRandom {
    mt: [u32; 624],
    index: usize,
}

impl PyRandom {
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        // init_by_array with key = [seed]
        let key = [seed];
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        PyRandom { mt, index: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(k + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `_randbelow(n)` for n < 2^32: `getrandbits(n.bit_length())` until below n.
    pub fn below(&mut self, n: u32) -> u32 {
        let k = 32 - n.leading_zeros();
        loop {
            let r = self.next_u32() >> (32 - k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(x)`.
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.below(i as u32 + 1) as usize;
            x.swap(i, j);
        }
    }
}

/// Indices of `n` sorted items split into (train, validation): shuffled with `seed`, the first
/// `floor(n * val_fraction)` are validation.
pub fn split_indices(n: usize, seed: u32, val_fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    PyRandom::new(seed).shuffle(&mut order);
    let n_val = ((n as f64) * val_fraction).floor() as usize;
    let val = order[..n_val].to_vec();
    let train = order[n_val..].to_vec();
    (train, val)
}

/// A run's validation list, `runs/<run>/val.txt`: one path relative to the data folder per
/// line, written by `fit` and read back by `fit --resume` and `eval --split`.
pub const VAL_LIST: &str = "val.txt";

/// Most bytes of a validation list read back (about 2 million paths).
pub const MAX_VAL_LIST_BYTES: u64 = 256 << 20;

/// A path's line in the validation list. File names may hold any byte but `/` and NUL: `\`,
/// LF and CR are written `\\`, `\n` and `\r`, and bytes that are not UTF-8 `\xHH`, so every
/// name is one line and two names never share one. Ordinary names are written as they are.
pub fn val_list_entry(root: &std::path::Path, path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path
        .strip_prefix(root)
        .unwrap_or(path)
        .as_os_str()
        .as_bytes();
    let mut line = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => line.push_str("\\\\"),
                '\n' => line.push_str("\\n"),
                '\r' => line.push_str("\\r"),
                c => line.push(c),
            }
        }
        for b in chunk.invalid() {
            line.push_str(&format!("\\x{b:02x}"));
        }
    }
    line
}

/// The entries of the validation list at `path` (as [`val_list_entry`] writes them), with the
/// file named in every error.
pub fn read_val_list(path: &std::path::Path) -> anyhow::Result<std::collections::HashSet<String>> {
    use anyhow::Context;
    let text = crate::fsutil::read_text_bounded(path, MAX_VAL_LIST_BYTES)
        .with_context(|| format!("cannot read {} (not a text file?)", path.display()))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is larger than {MAX_VAL_LIST_BYTES} bytes",
                path.display()
            )
        })?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_name_is_one_line_of_the_validation_list() {
        use std::os::unix::ffi::OsStrExt;
        let root = std::path::Path::new("/data");
        let name = |b: &[u8]| root.join(std::ffi::OsStr::from_bytes(b));
        assert_eq!(
            val_list_entry(root, &name(b"stamp/a b,c.jpg")),
            "stamp/a b,c.jpg"
        );
        assert_eq!(
            val_list_entry(root, &name("map/é.jpg".as_bytes())),
            "map/é.jpg"
        );
        let odd = [
            &b"stamp/two\nlines.jpg"[..],
            b"stamp/cr\r.jpg",
            b"stamp/back\\n.jpg",
            b"stamp/\xff.jpg",
            b"stamp/\xfe.jpg",
        ];
        let lines: Vec<String> = odd.iter().map(|b| val_list_entry(root, &name(b))).collect();
        assert!(
            lines.iter().all(|l| !l.contains('\n') && !l.contains('\r')),
            "{lines:?}"
        );
        let unique: std::collections::HashSet<&String> = lines.iter().collect();
        assert_eq!(unique.len(), odd.len(), "{lines:?}");
        assert_eq!(lines[3], "stamp/\\xff.jpg");
    }

    #[test]
    fn mersenne_twister_matches_python() {
        // python3 -c "import random; r = random.Random(777); print([r.getrandbits(32) for _ in range(3)])"
        let mut r = PyRandom::new(777);
        let got: Vec<u32> = (0..3).map(|_| r.next_u32()).collect();
        assert_eq!(got, PYTHON_777_FIRST3);
    }

    #[test]
    fn shuffle_matches_python() {
        // python3 -c "import random; x = list(range(20)); random.Random(777).shuffle(x); print(x)"
        let mut x: Vec<usize> = (0..20).collect();
        PyRandom::new(777).shuffle(&mut x);
        assert_eq!(x, PYTHON_777_SHUFFLE20);
    }

    #[test]
    fn split_takes_the_first_tenth_as_validation() {
        let (train, val) = split_indices(20, 777, 0.1);
        assert_eq!(val, PYTHON_777_SHUFFLE20[..2]);
        assert_eq!(train, PYTHON_777_SHUFFLE20[2..]);
        let (train, val) = split_indices(36, 777, 0.0);
        assert!(val.is_empty());
        assert_eq!(train.len(), 36);
        let (a, _) = split_indices(100, 1, 0.1);
        let (b, _) = split_indices(100, 2, 0.1);
        assert_ne!(a, b, "the seed changes the split");
    }

    const PYTHON_777_FIRST3: [u32; 3] = [984_982_403, 1_914_885_928, 1_913_820_983];
    const PYTHON_777_SHUFFLE20: [usize; 20] = [
        1, 3, 17, 10, 16, 2, 4, 6, 12, 9, 19, 0, 15, 5, 13, 8, 11, 18, 14, 7,
    ];
}
