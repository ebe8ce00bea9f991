//! Parsing untrusted safetensors bytes into LoRA tensors, with every size capped before it is
//! allocated.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::error::{AdapterError, Result};
use super::names::{check_tensors, normalise_name, LoraTensor};

/// Caps applied before parsing untrusted safetensors bytes allocates anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole file accepted.
    pub max_bytes: u64,
    /// Most tensors accepted.
    pub max_tensors: usize,
    /// Largest JSON header accepted.
    pub max_header_bytes: u64,
}

impl Limits {
    /// 1 GiB files, 4096 tensors, 4 MiB headers: room for rank-64 adapters on every
    /// linear layer of a 7B model (about 650 MB in f32, under 400 tensors).
    pub const DEFAULT: Limits = Limits {
        max_bytes: 1 << 30,
        max_tensors: 4096,
        max_header_bytes: 4 << 20,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

struct RawHeader {
    /// Tensor entries in file order, duplicates included.
    tensors: Vec<(String, RawTensorInfo)>,
    /// Total tensor entries seen (may exceed `tensors.len()` when over the limit).
    count: usize,
}

/// Reads the header map, keeping at most `max_tensors` entries (the rest are skipped
/// without allocating) and refusing a repeated `__metadata__`.
struct HeaderSeed {
    max_tensors: usize,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = RawHeader;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawHeader, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RawHeader, M::Error> {
        let mut header = RawHeader {
            tensors: Vec::new(),
            count: 0,
        };
        let mut seen_metadata = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if seen_metadata {
                    return Err(serde::de::Error::custom("__metadata__ appears twice"));
                }
                seen_metadata = true;
                // The spec allows only a string-to-string map; its content is not kept.
                map.next_value::<BTreeMap<String, String>>()?;
                continue;
            }
            header.count += 1;
            if header.count > self.max_tensors {
                map.next_value::<IgnoredAny>()?;
            } else {
                let info = map.next_value::<RawTensorInfo>()?;
                header.tensors.push((key, info));
            }
        }
        Ok(header)
    }
}

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

#[derive(Debug, Clone, Copy)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Parses untrusted safetensors bytes into canonical LoRA tensors (f32, names normalised).
///
/// Refuses inputs over `limits`, truncated files, headers whose offsets, sizes or dtypes
/// do not match the data (overlaps, gaps, ranges past the end, trailing bytes), tensors
/// that are not PEFT LoRA A/B weights, incomplete A/B pairs or pairs of different rank,
/// and non-finite values. Never panics; allocates at most the header plus about twice
/// the input size.
pub fn parse_safetensors(bytes: &[u8], limits: &Limits) -> Result<BTreeMap<String, LoraTensor>> {
    let (entries, data) = entries(bytes, limits)?;
    let mut tensors = BTreeMap::new();
    for e in entries {
        // In range: `entries` checked every end against `data.len()`.
        let tensor = e.decode(&data[e.begin as usize..e.end as usize]);
        if tensors.insert(e.name.clone(), tensor).is_some() {
            return Err(AdapterError::DuplicateTensor { tensor: e.name });
        }
    }
    check_tensors(&tensors)?;
    Ok(tensors)
}

/// Where each tensor of a safetensors file lies, for reading one tensor at a time (an
/// aggregation's peak memory is then a part of every input, not every input whole). Made by
/// the header checks of [`parse_safetensors`]; it reads no tensor, so values are checked
/// only by a full parse (`LoraAdapter::from_safetensors_bytes`) of the same bytes.
#[derive(Debug, Clone)]
pub struct SafetensorsIndex {
    /// By normalised name: dtype, shape, and the absolute byte range in the file.
    tensors: BTreeMap<String, Located>,
}

#[derive(Debug, Clone)]
struct Located {
    dtype: Dtype,
    shape: Vec<usize>,
    offset: u64,
    len: u64,
}

impl SafetensorsIndex {
    /// The index of `bytes` (a whole safetensors file), checked as [`parse_safetensors`]
    /// checks its header.
    pub fn of(bytes: &[u8], limits: &Limits) -> Result<SafetensorsIndex> {
        let (entries, data) = entries(bytes, limits)?;
        let start = (bytes.len() - data.len()) as u64;
        let mut tensors = BTreeMap::new();
        for e in entries {
            let located = Located {
                dtype: e.dtype,
                shape: e.shape,
                offset: start + e.begin,
                len: e.end - e.begin,
            };
            if tensors.insert(e.name.clone(), located).is_some() {
                return Err(AdapterError::DuplicateTensor { tensor: e.name });
            }
        }
        Ok(SafetensorsIndex { tensors })
    }

    /// The tensors' (normalised) names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The byte range (offset in the file, length) of tensor `name`.
    pub fn range(&self, name: &str) -> Option<(u64, u64)> {
        self.tensors.get(name).map(|l| (l.offset, l.len))
    }

    /// Tensor `name` from `raw`, the bytes of its [`SafetensorsIndex::range`].
    pub fn decode(&self, name: &str, raw: &[u8]) -> Result<LoraTensor> {
        let l = self
            .tensors
            .get(name)
            .ok_or_else(|| AdapterError::MissingTensor {
                tensor: name.to_string(),
            })?;
        if raw.len() as u64 != l.len {
            return Err(AdapterError::SizeMismatch {
                tensor: name.to_string(),
                expected: l.len,
                actual: raw.len() as u64,
            });
        }
        Ok(decode(l.dtype, l.shape.clone(), raw))
    }
}

/// `raw` (little-endian values of `dtype`) as an f32 tensor of `shape`.
fn decode(dtype: Dtype, shape: Vec<usize>, raw: &[u8]) -> LoraTensor {
    let data: Vec<f32> = match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::Bf16 => raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    LoraTensor { shape, data }
}

impl Entry {
    fn decode(&self, raw: &[u8]) -> LoraTensor {
        decode(self.dtype, self.shape.clone(), raw)
    }
}

/// The header checks of [`parse_safetensors`]: its entries (sorted by offset, tiling the data
/// section exactly) and the data section.
fn entries<'a>(bytes: &'a [u8], limits: &Limits) -> Result<(Vec<Entry>, &'a [u8])> {
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(AdapterError::TooLarge {
            len,
            max: limits.max_bytes,
        });
    }
    let (prefix, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or(AdapterError::Truncated { len, needed: 8 })?;
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > limits.max_header_bytes {
        return Err(AdapterError::HeaderTooLarge {
            len: header_len,
            max: limits.max_header_bytes,
        });
    }
    if header_len > rest.len() as u64 {
        return Err(AdapterError::Truncated {
            len,
            needed: header_len.saturating_add(8),
        });
    }
    let (header_bytes, data) = rest.split_at(header_len as usize);
    if header_bytes.first() != Some(&b'{') {
        return Err(AdapterError::InvalidHeader {
            reason: "the header does not start with '{'".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(header_bytes);
    let header = HeaderSeed {
        max_tensors: limits.max_tensors,
    }
    .deserialize(&mut de)
    .and_then(|h| de.end().map(|()| h))
    .map_err(|e| AdapterError::InvalidHeader {
        reason: e.to_string(),
    })?;
    if header.count > limits.max_tensors {
        return Err(AdapterError::TooManyTensors {
            count: header.count,
            max: limits.max_tensors,
        });
    }
    if header.tensors.is_empty() {
        return Err(AdapterError::NoTensors);
    }

    // Per-entry checks: name, dtype, shape, size of the byte range.
    let mut entries = Vec::with_capacity(header.tensors.len());
    for (raw_name, info) in header.tensors {
        let name = normalise_name(&raw_name).ok_or_else(|| AdapterError::NotLora {
            tensor: raw_name.clone(),
        })?;
        let dtype = match info.dtype.as_str() {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            _ => {
                return Err(AdapterError::UnsupportedDtype {
                    tensor: raw_name,
                    dtype: info.dtype,
                })
            }
        };
        let bad_shape = || AdapterError::BadShape {
            tensor: raw_name.clone(),
            shape: info.shape.clone(),
        };
        if info.shape.len() != 2 || info.shape.contains(&0) {
            return Err(bad_shape());
        }
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad_shape())?;
        let expected = info
            .shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(bad_shape)?;
        let [begin, end] = info.data_offsets;
        if end < begin {
            return Err(AdapterError::BadOffsets {
                tensor: raw_name,
                begin,
                end,
                reason: "end before start",
            });
        }
        if end - begin != expected {
            return Err(AdapterError::SizeMismatch {
                tensor: raw_name,
                expected,
                actual: end - begin,
            });
        }
        entries.push(Entry {
            name,
            dtype,
            shape,
            begin,
            end,
        });
    }

    // The byte ranges must tile the data section exactly: no overlap, gap or excess.
    let data_len = data.len() as u64;
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut cursor = 0u64;
    for e in &entries {
        if e.end > data_len {
            return Err(AdapterError::DataOutOfRange {
                tensor: e.name.clone(),
                end: e.end,
                data_len,
            });
        }
        if e.begin != cursor {
            return Err(AdapterError::BadOffsets {
                tensor: e.name.clone(),
                begin: e.begin,
                end: e.end,
                reason: if e.begin < cursor {
                    "overlap the previous tensor"
                } else {
                    "leave a gap after the previous tensor"
                },
            });
        }
        cursor = e.end;
    }
    if cursor != data_len {
        return Err(AdapterError::TrailingBytes {
            extra: data_len - cursor,
        });
    }

    Ok((entries, data))
}
