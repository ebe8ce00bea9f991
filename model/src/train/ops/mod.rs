//! Differentiable building blocks of LoRA training on CPU, each a forward and a backward function on
//! plain row-major `f32` slices.
//!
//! candle 0.11's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward pass (gradients
//! through them silently become zero) and its matmul backward also computes the gradient of the
//! frozen weight, so training does not use candle's autograd. [`crate::train`] chains these ops by
//! hand and keeps only what each backward needs.
//!
//! ```text
//!  frozen_forward / frozen_backward   x W^T and g W with W in its GGUF blocks: one weight at a time
//!                                     is dequantized into a scratch panel and multiplied by `gemm`
//!  lora_forward / lora_backward       s (x A^T) B^T, gradients of A and B and of x; lora_input_grad
//!                                     the input gradient alone (a frozen pair)
//!  rms_norm_*, rope_*, silu_mul_*     elementwise and per-row ops
//!  attention_*                        causal GQA softmax attention per packed sequence; the backward
//!                                     recomputes the probabilities from the saved log-sum-exp
//!  cross_entropy_fused                lm head + softmax + NLL over the vocabulary in chunks, with the
//!                                     gradient of the hidden state accumulated online: the
//!                                     `[tokens, vocab]` logits never exist at once
//!  DropoutMask                        counter-based, reproducible dropout as a bitset
//! ```
//!
//! Nothing here reduces across rayon tasks in a schedule-dependent order, so results are the same
//! from run to run on one machine with one thread count.

// Written as `%` when the workspace supported Rust 1.85 (`is_multiple_of` needs 1.87).
#![allow(clippy::manual_is_multiple_of)]

use crate::error::{ModelError, Result};

mod attention;
mod cross_entropy;
mod dropout;
mod frozen;
mod lora;
mod matmul;
mod rms_norm;
mod rope;
mod silu;

pub use attention::{attention_backward, attention_forward, causal_softmax, AttnShape};
pub use cross_entropy::{ce_chunk_rows, cross_entropy_fused, exp_fast, CeScratch};
pub use dropout::{mix_seed, DropoutMask};
pub use frozen::{dequant_blocks, dequantize_rows, frozen_backward, frozen_forward};
pub use lora::{lora_backward, lora_forward, lora_input_grad, LoraDims};
pub use matmul::{matmul, View};
pub use rms_norm::{rms_norm_backward, rms_norm_forward};
pub use rope::{rope_backward, rope_forward, RopeTable};
pub use silu::{silu_mul_backward, silu_mul_forward};

/// Up to this many values an elementwise or per-row op runs on the calling thread: handing
/// one token's rows to rayon costs more than the work.
const SERIAL: usize = 1 << 14;

/// `dst += src`, elementwise.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    let chunk = |(d, s): (&mut [f32], &[f32])| d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    if dst.len() <= SERIAL {
        chunk((dst, src));
    } else {
        dst.par_chunks_mut(8192)
            .zip(src.par_chunks(8192))
            .for_each(chunk);
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(ModelError::Training {
            reason: format!("{what}: {got} values, expected {want}"),
        });
    }
    Ok(())
}
