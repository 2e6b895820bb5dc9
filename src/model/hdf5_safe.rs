//! Reading an untrusted HDF5 file without leaving it and within bounded memory.
//!
//! HDF5 follows external links into other files, reads datasets whose storage is another file
//! (external storage, virtual datasets) and lets its deflate filter grow a chunk's output past the
//! chunk's size. Here every path is resolved link by link (only hard links and soft links that
//! stay in the file), a dataset is read only when its storage is in the file, and a compressed
//! dataset is read chunk by chunk in raw form and inflated here, never past the chunk's size.
//! Attributes holding names are bounded in count and length before they are read.

use hdf5::dataset::Layout;
use hdf5::filters::Filter;
use hdf5::types::{FloatSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::Dataset;
use hdf5_sys::h5i::hid_t;
use hdf5_sys::h5l::{H5L_info1_t, H5L_type_t};
use hdf5_sys::h5p::H5P_DEFAULT;

/// Soft links followed for one path (HDF5's own limit).
pub const MAX_LINK_HOPS: usize = 16;
/// Names one attribute may list (an EfficientNet-B7 has under 1000 layers).
pub const MAX_NAMES: usize = 10_000;
/// Bytes of one name, and of one soft link's target.
pub const MAX_NAME_BYTES: usize = 1024;

/// Joins path components into an absolute HDF5 path.
fn absolute(parts: &[String]) -> String {
    format!("/{}", parts.join("/"))
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(String::from)
        .collect()
}

/// What one link is, read without following it.
enum Link {
    Missing,
    Hard,
    Soft(String),
    External(String),
}

/// The link at `path`, whose parent is reached through hard links only.
fn link_at(file: hid_t, path: &str) -> Result<Link, String> {
    let c_path = std::ffi::CString::new(path).map_err(|_| format!("{path}: a NUL in the name"))?;
    hdf5::sync::sync(|| unsafe {
        if hdf5_sys::h5l::H5Lexists(file, c_path.as_ptr(), H5P_DEFAULT) <= 0 {
            return Ok(Link::Missing);
        }
        let mut info = H5L_info1_t::default();
        if hdf5_sys::h5l::H5Lget_info1(file, c_path.as_ptr(), &mut info, H5P_DEFAULT) < 0 {
            return Err(format!("{path}: unreadable link"));
        }
        if info.type_ == H5L_type_t::H5L_TYPE_HARD {
            return Ok(Link::Hard);
        }
        let size = *info.u.val_size();
        if size > MAX_NAME_BYTES {
            return Err(format!("{path}: a link with a {size}-byte value"));
        }
        let mut buf = vec![0u8; size.max(1)];
        let read = hdf5_sys::h5l::H5Lget_val(
            file,
            c_path.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            H5P_DEFAULT,
        );
        if read < 0 {
            return Err(format!("{path}: unreadable link"));
        }
        let text = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        Ok(match info.type_ {
            H5L_type_t::H5L_TYPE_SOFT => Link::Soft(text(&buf)),
            // The external link's value: a flags byte, the file name, the object's path.
            H5L_type_t::H5L_TYPE_EXTERNAL => Link::External(text(buf.get(1..).unwrap_or(&[]))),
            _ => Link::External("a user-defined link".into()),
        })
    })
}

/// Resolves `path` (from the file's root) through hard links and soft links that stay in the
/// file, and returns the same object's path made of hard links only, or `None` when nothing is
/// there. Refuses external links, dangling soft links and soft-link loops.
pub fn resolve(file: &hdf5::File, path: &str) -> Result<Option<String>, String> {
    let id = file.id();
    let mut pending = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        let mut here = resolved.clone();
        here.push(part.clone());
        let here = absolute(&here);
        match link_at(id, &here)? {
            Link::Hard => resolved.push(part),
            Link::Missing if hops == 0 => return Ok(None),
            Link::Missing => {
                return Err(format!(
                    "{path}: a soft link that points at nothing ({here})"
                ))
            }
            Link::External(target) => {
                return Err(format!(
                    "{path}: an external link to another file ({target}); only the file's own \
                     data is read"
                ))
            }
            Link::Soft(target) => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(format!(
                        "{path}: soft links loop (more than {MAX_LINK_HOPS} followed)"
                    ));
                }
                if target.starts_with('/') {
                    resolved.clear();
                }
                pending.extend(components(&target).into_iter().rev());
            }
        }
    }
    Ok(Some(absolute(&resolved)))
}

/// The number of elements of a shape, or `None` when it overflows.
pub fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Reads a list of names stored as variable- or fixed-length ASCII/UTF-8 (h5py writes both,
/// depending on its version), after checking their count and length. An empty numeric array
/// (h5py's way of writing an empty list) gives an empty list.
pub fn read_names(attr: &hdf5::Attribute) -> Result<Vec<String>, String> {
    let count = elements(&attr.shape()).unwrap_or(usize::MAX);
    if count > MAX_NAMES {
        return Err(format!(
            "it claims {count} names (at most {MAX_NAMES} are read)"
        ));
    }
    let descriptor = attr
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| e.to_string())?;
    let strip = |s: &str| s.trim_end_matches('\0').to_string();
    let e = |e: hdf5::Error| e.to_string();
    let names: Vec<String> = match descriptor {
        TypeDescriptor::FixedAscii(n) | TypeDescriptor::FixedUnicode(n) if n > MAX_NAME_BYTES => {
            return Err(format!(
                "names of {n} bytes (at most {MAX_NAME_BYTES} are read)"
            ))
        }
        TypeDescriptor::VarLenAscii => attr
            .read_raw::<VarLenAscii>()
            .map_err(e)?
            .iter()
            .map(|s| strip(s.as_str()))
            .collect(),
        TypeDescriptor::VarLenUnicode => attr
            .read_raw::<VarLenUnicode>()
            .map_err(e)?
            .iter()
            .map(|s| strip(s.as_str()))
            .collect(),
        TypeDescriptor::FixedAscii(_) => attr
            .read_raw::<hdf5::types::FixedAscii<MAX_NAME_BYTES>>()
            .map_err(e)?
            .iter()
            .map(|s| strip(s.as_str()))
            .collect(),
        TypeDescriptor::FixedUnicode(_) => attr
            .read_raw::<hdf5::types::FixedUnicode<MAX_NAME_BYTES>>()
            .map_err(e)?
            .iter()
            .map(|s| strip(s.as_str()))
            .collect(),
        _ if count == 0 => Vec::new(),
        other => return Err(format!("expected strings, found {other}")),
    };
    if let Some(long) = names.iter().find(|n| n.len() > MAX_NAME_BYTES) {
        return Err(format!(
            "a name of {} bytes (at most {MAX_NAME_BYTES} are read)",
            long.len()
        ));
    }
    Ok(names)
}

/// How a dataset's values are stored, once checked.
pub struct Storage {
    pub shape: Vec<usize>,
    /// Bytes per value (4 or 8) and whether they are big-endian.
    elem: usize,
    big_endian: bool,
    filters: Vec<Filter>,
    chunk: Option<Vec<usize>>,
}

/// Checks that a dataset holds floating-point numbers stored in this file: not virtual, no
/// external storage, no filter but deflate and shuffle, chunks no larger than the dataset.
pub fn storage(ds: &Dataset) -> Result<Storage, String> {
    let e = |e: hdf5::Error| e.to_string();
    let dcpl = ds.create_plist().map_err(e)?;
    if dcpl.get_layout().map_err(e)? == Layout::Virtual {
        return Err("a virtual dataset (its values live in other files); refused".into());
    }
    if let Some(ext) = dcpl.get_external().map_err(e)?.first() {
        return Err(format!(
            "its values are stored outside the file (external storage in {}); refused",
            ext.name
        ));
    }
    let dtype = ds.dtype().map_err(e)?;
    let elem = match dtype.to_descriptor().map_err(e)? {
        TypeDescriptor::Float(FloatSize::U4) => 4,
        TypeDescriptor::Float(FloatSize::U8) => 8,
        other => return Err(format!("holds {other}, not 32- or 64-bit floats")),
    };
    let big_endian = dtype.byte_order() == hdf5::datatype::ByteOrder::BigEndian;
    let filters = dcpl.get_filters().map_err(e)?;
    if let Some(f) = filters
        .iter()
        .find(|f| !matches!(f, Filter::Deflate(_) | Filter::Shuffle | Filter::Fletcher32))
    {
        return Err(format!(
            "compressed with {f:?}; only deflate (gzip), shuffle and fletcher32 are read"
        ));
    }
    let shape = ds.shape();
    let chunk = dcpl.get_chunk().map_err(e)?;
    if let Some(c) = &chunk {
        let fits =
            c.len() == shape.len() && c.iter().zip(&shape).all(|(&c, &d)| c >= 1 && c <= d.max(1));
        if !fits {
            return Err(format!("chunks of {c:?} for a shape of {shape:?}"));
        }
    }
    Ok(Storage {
        shape,
        elem,
        big_endian,
        filters,
        chunk,
    })
}

/// Reads a checked dataset's values as f32. The caller has bounded `storage.shape`.
pub fn read_f32(ds: &Dataset, storage: &Storage) -> Result<Vec<f32>, String> {
    let n = elements(&storage.shape).ok_or("a shape whose size overflows")?;
    let values = match (&storage.chunk, storage.filters.is_empty()) {
        (Some(chunk), false) => read_chunks(ds, storage, chunk, n)?,
        _ => ds.read_raw::<f32>().map_err(|e| e.to_string())?,
    };
    if values.len() != n {
        return Err(format!(
            "{} values for a shape of {:?}",
            values.len(),
            storage.shape
        ));
    }
    Ok(values)
}

/// The chunks of a compressed dataset, read raw, inflated here within the chunk's size and put
/// in place. Chunks not stored keep the dataset's fill value.
fn read_chunks(ds: &Dataset, s: &Storage, chunk: &[usize], n: usize) -> Result<Vec<f32>, String> {
    let chunk_values = elements(chunk).ok_or("chunks whose size overflows")?;
    let chunk_bytes = chunk_values * s.elem;
    // Deflate's worst case on incompressible data adds well under 1% (zlib: 5 bytes a block).
    let max_stored = chunk_bytes + chunk_bytes / 64 + 64;
    let grid = s
        .shape
        .iter()
        .zip(chunk)
        .map(|(&d, &c)| d.div_ceil(c))
        .try_fold(1usize, |a, b| a.checked_mul(b))
        .ok_or("too many chunks")?;
    let stored = ds.num_chunks().ok_or("unreadable chunk index")?;
    if stored > grid {
        return Err(format!("{stored} chunks stored where {grid} fit"));
    }
    let fill = ds
        .create_plist()
        .ok()
        .and_then(|p| p.fill_value_as::<f32>())
        .unwrap_or(0.0);
    let mut out = vec![fill; n];
    for index in 0..stored {
        let info = ds
            .chunk_info(index)
            .ok_or_else(|| format!("chunk {index} is unreadable"))?;
        let (offset, size) = (
            info.offset,
            usize::try_from(info.size).unwrap_or(usize::MAX),
        );
        let at: Vec<usize> = offset.iter().map(|&o| o as usize).collect();
        if at.len() != chunk.len() {
            return Err(format!(
                "chunk {index} has a {}-dimensional offset",
                at.len()
            ));
        }
        let aligned = at
            .iter()
            .zip(chunk)
            .zip(&s.shape)
            .all(|((&o, &c), &d)| o % c == 0 && o < d);
        if !aligned {
            return Err(format!("a chunk stored at {at:?}, outside the shape"));
        }
        if size > max_stored {
            return Err(format!(
                "the chunk at {at:?} takes {size} bytes in the file, more than its {chunk_bytes} \
                 bytes of values can need"
            ));
        }
        let mut raw = vec![0u8; size];
        let mut mask = 0u32;
        let rc = hdf5::sync::sync(|| unsafe {
            hdf5_sys::h5d::H5Dread_chunk(
                ds.id(),
                H5P_DEFAULT,
                offset.as_ptr(),
                &mut mask,
                raw.as_mut_ptr().cast(),
            )
        });
        if rc < 0 {
            return Err(format!("the chunk at {at:?} is unreadable"));
        }
        let bytes = unfilter(raw, &s.filters, mask, chunk_bytes, s.elem)
            .map_err(|e| format!("the chunk at {at:?}: {e}"))?;
        place(&bytes, s, &at, chunk, &mut out);
    }
    Ok(out)
}

/// Undoes a chunk's filters (last applied first), skipping those its mask says were not applied.
/// The result is exactly `chunk_bytes` long.
fn unfilter(
    mut bytes: Vec<u8>,
    filters: &[Filter],
    mask: u32,
    chunk_bytes: usize,
    elem: usize,
) -> Result<Vec<u8>, String> {
    for (i, f) in filters.iter().enumerate().rev() {
        if i < 32 && mask & (1 << i) != 0 {
            continue;
        }
        bytes = match f {
            Filter::Deflate(_) => inflate(&bytes, chunk_bytes)?,
            Filter::Shuffle => unshuffle(&bytes, elem),
            Filter::Fletcher32 => checked(bytes)?,
            other => return Err(format!("unsupported filter {other:?}")),
        };
    }
    if bytes.len() != chunk_bytes {
        return Err(format!(
            "{} bytes of values where the chunk holds {chunk_bytes}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Inflates a zlib stream, refusing one that gives more than `limit` bytes.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::with_capacity(limit);
    flate2::read::ZlibDecoder::new(compressed)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("damaged deflate data ({e})"))?;
    if out.len() > limit {
        return Err(format!(
            "inflates to more than the {limit} bytes the chunk holds (a decompression bomb)"
        ));
    }
    Ok(out)
}

/// A chunk without its Fletcher-32 checksum (the last 4 bytes, little-endian), once verified.
fn checked(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let Some(at) = bytes.len().checked_sub(4) else {
        return Err("too short for its checksum".into());
    };
    let stored = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    bytes.truncate(at);
    if fletcher32(&bytes) != stored {
        return Err("its Fletcher-32 checksum does not match; the file is damaged".into());
    }
    Ok(bytes)
}

/// HDF5's Fletcher-32: sums of big-endian 16-bit words (an odd last byte is the high half).
pub fn fletcher32(data: &[u8]) -> u32 {
    let (mut sum1, mut sum2) = (0u32, 0u32);
    let fold = |s: u32| (s & 0xffff) + (s >> 16);
    for block in data.chunks(720) {
        for word in block.chunks(2) {
            let high = u32::from(word[0]) << 8;
            // Wrapping, as HDF5's C code does.
            sum1 = sum1.wrapping_add(high | word.get(1).map_or(0, |&b| u32::from(b)));
            sum2 = sum2.wrapping_add(sum1);
        }
        sum1 = fold(sum1);
        sum2 = fold(sum2);
    }
    sum1 = fold(sum1);
    sum2 = fold(sum2);
    (sum2 << 16) | sum1
}

/// Undoes HDF5's shuffle filter: the bytes were grouped by their position within each value.
pub fn unshuffle(bytes: &[u8], elem: usize) -> Vec<u8> {
    let n = bytes.len() / elem;
    let mut out = bytes.to_vec();
    if elem <= 1 || n <= 1 {
        return out;
    }
    for i in 0..n {
        for b in 0..elem {
            out[i * elem + b] = bytes[b * n + i];
        }
    }
    out
}

/// Copies one chunk's values to their places in the row-major `out`, leaving out the parts of
/// an edge chunk past the shape.
fn place(bytes: &[u8], s: &Storage, at: &[usize], chunk: &[usize], out: &mut [f32]) {
    let rank = chunk.len();
    let mut index = vec![0usize; rank];
    for value in bytes.chunks_exact(s.elem) {
        let mut flat = 0usize;
        let mut inside = true;
        for k in 0..rank {
            let g = at[k] + index[k];
            inside &= g < s.shape[k];
            flat = flat * s.shape[k] + g;
        }
        if inside {
            out[flat] = decode(value, s.big_endian);
        }
        for k in (0..rank).rev() {
            index[k] += 1;
            if index[k] < chunk[k] {
                break;
            }
            index[k] = 0;
        }
    }
}

fn decode(value: &[u8], big_endian: bool) -> f32 {
    match (value.len(), big_endian) {
        (4, false) => f32::from_le_bytes([value[0], value[1], value[2], value[3]]),
        (4, true) => f32::from_be_bytes([value[0], value[1], value[2], value[3]]),
        (_, be) => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&value[..8]);
            (if be {
                f64::from_be_bytes(b)
            } else {
                f64::from_le_bytes(b)
            }) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflate_stops_at_the_limit() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 10 << 20]).unwrap();
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 20_000);
        let err = inflate(&bomb, 4096).unwrap_err();
        assert!(err.contains("decompression bomb"), "{err}");
        assert_eq!(inflate(&bomb, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn unshuffle_regroups_bytes() {
        // Two 4-byte values 0x01020304, 0x05060708 shuffled: first bytes, second bytes...
        let shuffled = [1, 5, 2, 6, 3, 7, 4, 8];
        assert_eq!(unshuffle(&shuffled, 4), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn elements_refuses_overflow() {
        assert_eq!(elements(&[0, usize::MAX]), Some(0));
        assert_eq!(elements(&[usize::MAX, 2]), None);
        assert_eq!(elements(&[3, 4]), Some(12));
    }
}
