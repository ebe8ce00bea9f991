//! What can go wrong with an adapter, as one error type.

use std::path::PathBuf;

use hivemind_protocol::Hash;

/// Everything that can go wrong reading, writing, checking or aggregating adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON for an [`AdapterConfig`](super::AdapterConfig).
    #[error("invalid adapter config JSON: {source}")]
    ConfigJson {
        /// The parse error.
        source: serde_json::Error,
    },
    /// A config field holds a value HiveMind does not support.
    #[error("adapter config field `{field}` is {value}, expected {expected}")]
    InvalidConfig {
        /// The field name.
        field: &'static str,
        /// The value found.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The input is larger than the limit.
    #[error("input of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the input.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The file ends before its header does.
    #[error("truncated safetensors file: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Length of the input.
        len: u64,
        /// Length the header requires.
        needed: u64,
    },
    /// The header length exceeds the limit.
    #[error("safetensors header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// Declared header length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The header is not a valid safetensors JSON header.
    #[error("invalid safetensors header: {reason}")]
    InvalidHeader {
        /// What is wrong.
        reason: String,
    },
    /// The header lists more tensors than the limit.
    #[error("{count} tensors exceed the limit of {max}")]
    TooManyTensors {
        /// Number of tensors in the header (at least this many).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The file holds no tensors.
    #[error("the adapter holds no tensors")]
    NoTensors,
    /// A tensor's dtype is not F32, F16 or BF16.
    #[error("tensor {tensor}: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        /// The tensor name as found.
        tensor: String,
        /// The dtype as found.
        dtype: String,
    },
    /// A tensor is not a 2-D matrix with non-zero dimensions.
    #[error("tensor {tensor}: shape {shape:?} is not a non-empty 2-D matrix")]
    BadShape {
        /// The tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<u64>,
    },
    /// A tensor's byte range does not match its dtype and shape.
    #[error("tensor {tensor}: {actual} data bytes, but dtype and shape need {expected}")]
    SizeMismatch {
        /// The tensor name.
        tensor: String,
        /// Bytes the dtype and shape need.
        expected: u64,
        /// Bytes the offsets give.
        actual: u64,
    },
    /// A tensor's byte range is reversed, overlaps another or leaves a gap.
    #[error("tensor {tensor}: data offsets [{begin}, {end}] {reason}")]
    BadOffsets {
        /// The tensor name.
        tensor: String,
        /// Declared start.
        begin: u64,
        /// Declared end.
        end: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A tensor's data runs past the end of the file.
    #[error("tensor {tensor}: data ends at {end}, past the {data_len} data bytes in the file")]
    DataOutOfRange {
        /// The tensor name.
        tensor: String,
        /// Declared end (relative to the data start).
        end: u64,
        /// Bytes of data in the file.
        data_len: u64,
    },
    /// Bytes after the last tensor's data.
    #[error("{extra} bytes after the last tensor's data")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// A tensor name is not a PEFT LoRA A/B weight name.
    #[error(
        "tensor {tensor}: not a LoRA weight (expected base_model.model.<module>.lora_A.weight or .lora_B.weight)"
    )]
    NotLora {
        /// The tensor name as found.
        tensor: String,
    },
    /// Two tensors with the same (normalised) name.
    #[error("tensor {tensor} appears more than once")]
    DuplicateTensor {
        /// The normalised name.
        tensor: String,
    },
    /// A tensor an index was asked for that the file does not hold.
    #[error("tensor {tensor} is not in the file")]
    MissingTensor {
        /// Its name.
        tensor: String,
    },
    /// A LoRA A without its B, or a B without its A.
    #[error("tensor {tensor} has no partner {missing}")]
    MissingPair {
        /// The tensor present.
        tensor: String,
        /// The partner that is missing.
        missing: String,
    },
    /// A tensor's LoRA rank differs from its partner's or from the config's `r`.
    #[error("tensor {tensor}: LoRA rank {actual}, expected {expected}")]
    RankMismatch {
        /// The tensor name.
        tensor: String,
        /// Rank expected.
        expected: usize,
        /// Rank found.
        actual: usize,
    },
    /// A NaN or infinite value.
    #[error("tensor {tensor}: non-finite value at index {index}")]
    NonFinite {
        /// The tensor name.
        tensor: String,
        /// Flat index of the first such value.
        index: usize,
    },
    /// A tensor's data length does not match its shape (in-memory adapters only).
    #[error("tensor {tensor}: {actual} values for shape {shape:?} ({expected} expected)")]
    DataLength {
        /// The tensor name.
        tensor: String,
        /// The shape.
        shape: Vec<usize>,
        /// Values the shape needs.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// The adapter's config disagrees with the network's model.
    #[error("adapter config `{field}` is {actual}, the network's model expects {expected}")]
    ConfigMismatch {
        /// The config field.
        field: &'static str,
        /// Expected value.
        expected: String,
        /// Value found.
        actual: String,
    },
    /// A tensor's shape disagrees with the network's model.
    #[error("tensor {tensor}: shape {actual:?}, the network's model expects {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        tensor: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// A tensor targets a module the network's model does not adapt.
    #[error("tensor {tensor}: module `{module}` is not adapted by the network's model")]
    UnexpectedModule {
        /// The tensor name.
        tensor: String,
        /// The module (kind or path) found.
        module: String,
    },
    /// A tensor targets a layer past the model's last.
    #[error("tensor {tensor}: layer {layer}, but the network's model has {num_layers} layers")]
    LayerOutOfRange {
        /// The tensor name.
        tensor: String,
        /// Layer index found.
        layer: usize,
        /// Layers in the model.
        num_layers: usize,
    },
    /// Two tensors adapt the same (layer, module kind).
    #[error("tensor {tensor} adapts a (layer, module) already adapted by another tensor")]
    DuplicateModule {
        /// The tensor name.
        tensor: String,
    },
    /// A (layer, module kind) the network's model adapts has no LoRA pair.
    #[error("no LoRA weights for module `{module}` of layer {layer}")]
    MissingModule {
        /// Layer index.
        layer: usize,
        /// Module kind.
        module: String,
    },
    /// Adapters that cannot be applied together (see `aggregate::stack`).
    #[error("cannot stack adapters: {reason}")]
    Stack {
        /// Why.
        reason: String,
    },
    /// Aggregation over zero inputs.
    #[error("aggregation needs at least one input adapter")]
    NoInputs,
    /// The same adapter hash given twice to an aggregation.
    #[error("adapter {hash} is given more than once")]
    DuplicateInput {
        /// The repeated hash.
        hash: Hash,
    },
    /// An aggregation input is not a valid adapter.
    #[error("adapter {hash} is invalid: {source}")]
    InvalidInput {
        /// The input's hash.
        hash: Hash,
        /// Why it is invalid.
        source: Box<AdapterError>,
    },
    /// An aggregation input differs from the first input (in canonical order).
    #[error("adapter {hash} is incompatible with adapter {reference}: {what} is {actual}, expected {expected}")]
    Incompatible {
        /// The differing input.
        hash: Hash,
        /// The first input in canonical (hash) order (boxed to keep the error small).
        reference: Box<Hash>,
        /// What differs (a config field or a tensor).
        what: String,
        /// The reference's value.
        expected: String,
        /// The differing input's value.
        actual: String,
    },
    /// An aggregation produced a NaN or infinite value (overflow).
    #[error("aggregation produced a non-finite value in tensor {tensor} at index {index}")]
    NonFiniteResult {
        /// The tensor name.
        tensor: String,
        /// Flat index.
        index: usize,
    },
}

pub(super) type Result<T, E = AdapterError> = std::result::Result<T, E>;
