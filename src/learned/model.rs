//! The model file: a versioned, checksummed header and int8 tensors, loaded with bounds checks
//! and never trusted (`training/README.md` documents the format; the trainer writes it).
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 8 | magic `MGMODEL\0` |
//! | 8 | 4 | u32 LE format version (1) |
//! | 12 | 4 | u32 LE header length |
//! | 16 | header | JSON header (labels, thresholds, calibration, features, tensors) |
//! | … | | zero padding to a multiple of 16: the data section starts here |
//! | end − 32 | 32 | BLAKE3-256 of every preceding byte |

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// The labels a model may have a head for, in the order the file lists them.
pub const LABELS: [&str; 8] = [
    "RULE-MIST-001",
    "RULE-MIST-004",
    "RULE-MIST-005",
    "RULE-MIST-006",
    "RULE-MIST-007",
    "RULE-MIST-008",
    "RULE-MIST-009",
    "RULE-MIST-010",
];

/// Number of heads.
pub const HEADS: usize = LABELS.len();

const MAGIC: &[u8; 8] = b"MGMODEL\0";
const FORMAT_VERSION: u32 = 1;
/// Largest hash table the runtime accepts (2^22 buckets × 8 heads = 32 MiB).
const MAX_KBITS: u32 = 22;

/// A model file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    pub file: String,
    pub message: String,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for ModelError {}

/// One head's decision thresholds, on its calibrated probability.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, serde::Serialize)]
pub struct Thresholds {
    /// At or above: FLAG (and evidence that adds up with the rule's triggers).
    pub flag: f32,
    /// At or above: the rule's action.
    pub act: f32,
    /// At or above: the rule's action where the rule wants more than the model alone below
    /// it (RULE-MIST-005 and 006 by default).
    pub act_model_only: f32,
}

/// A loaded model: the hashed n-gram table and one calibrated logistic head per label.
pub struct Model {
    /// Where it came from (a path, or `<bundled>`).
    pub source: String,
    /// `created` from the header: names this model in `mistguard check` and decision records.
    pub version: String,
    pub enabled: [bool; HEADS],
    pub thresholds: [Thresholds; HEADS],
    calib_a: [f32; HEADS],
    calib_c: [f32; HEADS],
    bias: [f32; HEADS],
    scale: [f32; HEADS],
    pub kbits: u32,
    /// `[2^kbits][HEADS]` int8 weights, row-major.
    weights: Box<[i8]>,
    /// Bytes of the file.
    pub file_bytes: usize,
}

#[derive(Deserialize)]
struct Header {
    labels: Vec<String>,
    #[serde(default)]
    enabled: BTreeMap<String, bool>,
    thresholds: BTreeMap<String, Thresholds>,
    calibration: Calibration,
    features: Features,
    tensors: Vec<Tensor>,
    #[serde(default)]
    created: String,
}

#[derive(Deserialize)]
struct Calibration {
    a: Vec<f32>,
    c: Vec<f32>,
}

#[derive(Deserialize)]
struct Features {
    hash: HashConfig,
}

#[derive(Deserialize)]
struct HashConfig {
    kbits: u32,
    nmin: u32,
    nmax: u32,
    flags: u32,
}

#[derive(Deserialize)]
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    offset: usize,
    nbytes: usize,
    #[serde(default)]
    scale: Vec<f32>,
}

impl Model {
    /// Parses and checks a model file.
    ///
    /// # Errors
    /// A wrong magic or format version, a checksum mismatch, a header that is not the expected
    /// JSON, labels or feature settings this runtime does not know, a tensor that runs past the
    /// data or whose shape does not match its size, non-finite numbers.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Model, ModelError> {
        let err = |m: String| ModelError {
            file: source.to_string(),
            message: m,
        };
        if bytes.len() < 16 + 32 || &bytes[..8] != MAGIC {
            return Err(err("not a mistguard model file (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(err(format!(
                "model format version {version}; this build reads version {FORMAT_VERSION}"
            )));
        }
        let body = &bytes[..bytes.len() - 32];
        let sum = blake3::hash(body);
        if sum.as_bytes() != &bytes[bytes.len() - 32..] {
            return Err(err(
                "checksum mismatch: the file is corrupt or truncated".into()
            ));
        }
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        if 16 + header_len > body.len() {
            return Err(err("header runs past the end of the file".into()));
        }
        let header: Header = serde_json::from_slice(&bytes[16..16 + header_len])
            .map_err(|e| err(format!("header: {e}")))?;
        let data_start = (16 + header_len).div_ceil(16) * 16;
        let data = body
            .get(data_start..)
            .ok_or_else(|| err("no data section".into()))?;
        if header.labels.len() != HEADS || header.labels.iter().zip(LABELS).any(|(a, b)| a != b) {
            return Err(err(format!(
                "labels {:?}; this build knows {:?} in that order",
                header.labels, LABELS
            )));
        }
        let h = &header.features.hash;
        if h.nmin != 1 || h.nmax != 4 || h.flags != 7 {
            return Err(err(format!(
                "features: n-grams {}..{} with flags {}; this build computes 1..4 with flags 7",
                h.nmin, h.nmax, h.flags
            )));
        }
        if !(8..=MAX_KBITS).contains(&h.kbits) {
            return Err(err(format!(
                "features: kbits {} (8..={MAX_KBITS})",
                h.kbits
            )));
        }
        let vec8 = |v: &[f32], what: &str| -> Result<[f32; HEADS], ModelError> {
            if v.len() != HEADS || v.iter().any(|x| !x.is_finite()) {
                return Err(err(format!("{what}: {HEADS} finite numbers expected")));
            }
            Ok(v.try_into().unwrap())
        };
        let calib_a = vec8(&header.calibration.a, "calibration.a")?;
        let calib_c = vec8(&header.calibration.c, "calibration.c")?;
        let mut thresholds = [Thresholds {
            flag: 1.0,
            act: 1.0,
            act_model_only: 1.0,
        }; HEADS];
        let mut enabled = [false; HEADS];
        for (i, label) in LABELS.iter().enumerate() {
            let t = header
                .thresholds
                .get(*label)
                .ok_or_else(|| err(format!("no thresholds for {label}")))?;
            if [t.flag, t.act, t.act_model_only]
                .iter()
                .any(|x| !x.is_finite())
            {
                return Err(err(format!("thresholds of {label} are not finite")));
            }
            thresholds[i] = *t;
            enabled[i] = header.enabled.get(*label).copied().unwrap_or(true);
        }
        let tensor = |name: &str, dtype: &str, shape: &[usize], size: usize| {
            let t = header
                .tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| err(format!("no tensor `{name}`")))?;
            if t.dtype != dtype || t.shape != shape {
                return Err(err(format!(
                    "tensor `{name}` is {} {:?}; expected {dtype} {shape:?}",
                    t.dtype, t.shape
                )));
            }
            let want = shape.iter().product::<usize>() * size;
            if t.nbytes != want {
                return Err(err(format!(
                    "tensor `{name}` has {} bytes for shape {shape:?}",
                    t.nbytes
                )));
            }
            let end = t.offset.checked_add(t.nbytes).filter(|&e| e <= data.len());
            match end {
                Some(end) => Ok((t, &data[t.offset..end])),
                None => Err(err(format!("tensor `{name}` runs past the data section"))),
            }
        };
        let rows = 1usize << h.kbits;
        let (w, wbytes) = tensor("hash.w", "i8", &[rows, HEADS], 1)?;
        let scale = vec8(&w.scale, "hash.w scale")?;
        let (_, bbytes) = tensor("bias", "f32", &[HEADS], 4)?;
        let bias: Vec<f32> = bbytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let bias = vec8(&bias, "bias")?;
        Ok(Model {
            source: source.to_string(),
            version: header.created,
            enabled,
            thresholds,
            calib_a,
            calib_c,
            bias,
            scale,
            kbits: h.kbits,
            weights: wbytes.iter().map(|&b| b as i8).collect(),
            file_bytes: bytes.len(),
        })
    }

    /// The row of a feature's bucket: one int8 weight per head.
    #[inline]
    pub(crate) fn row(&self, bucket: u32) -> &[i8; HEADS] {
        let at = bucket as usize * HEADS;
        self.weights[at..at + HEADS].try_into().unwrap()
    }

    /// The calibrated probability of each head for a window: the sum of its features' weight
    /// rows (`acc`) and their number (`n`), pooled as sum / √n.
    pub fn probabilities(&self, acc: &[i32; HEADS], n: u32) -> [f32; HEADS] {
        let norm = 1.0 / (n.max(1) as f32).sqrt();
        let mut p = [0f32; HEADS];
        for l in 0..HEADS {
            let z = self.bias[l] + self.scale[l] * acc[l] as f32 * norm;
            let y = self.calib_a[l] * z + self.calib_c[l];
            p[l] = 1.0 / (1.0 + (-y).exp());
        }
        p
    }

    /// Bytes the model holds in memory.
    pub fn memory_bytes(&self) -> usize {
        self.weights.len() + std::mem::size_of::<Self>()
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("version", &self.version)
            .field("kbits", &self.kbits)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}
