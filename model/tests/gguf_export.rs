//! GGUF export for llama.cpp, on tiny generated models of both families (llama: q/k rows
//! permuted in GGUF; qwen2: not):
//! - the merged GGUF, loaded by our own loader (which un-permutes q/k rows), gives the logits
//!   of the base model with the adapter applied unmerged;
//! - the LoRA GGUF, read as llama.cpp reads it (ggml shapes `a: [in, r]`, `b: [r, out]`, scale
//!   `adapter.lora.alpha / r` with r from B), adds to each base weight exactly what the merged
//!   file added to it, both in the file's own (permuted) row order.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use hivemind_model::config::Arch;
use hivemind_model::gguf_export::{write_lora_gguf, write_merged_gguf, MergedType};
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_model::{BaseModel, LoadOptions, Module};

const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn dense(path: &Path) -> (gguf_file::Content, HashMap<String, Tensor>) {
    let mut f = File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut out = HashMap::new();
    for name in c.tensor_infos.keys() {
        let t = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        out.insert(name.clone(), t.dequantize(&Device::Cpu).unwrap());
    }
    (c, out)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(arch: Arch, rslora: bool) {
    let work = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(arch, 1).unwrap();
    let base = work.path().join("base.gguf");
    tiny.write_gguf(&base).unwrap();
    let modules: Vec<String> = MODULES.iter().map(|s| s.to_string()).collect();
    let shape = tiny.cfg.adapter_shape(4, &modules).unwrap();
    let mut adapter = random_adapter(&shape, 8.0, 7).unwrap();
    adapter.config.use_rslora = rslora;
    let scaling = adapter.config.scaling();

    // Merged: our loader gives the logits of base + adapter (applied unmerged).
    let merged = work.path().join("merged.gguf");
    write_merged_gguf(&base, &adapter, "test", MergedType::F32, &merged).unwrap();
    let mut with = BaseModel::load(&base, &LoadOptions::default()).unwrap();
    with.decoder.apply_adapter(&adapter).unwrap();
    let plain = BaseModel::load(&base, &LoadOptions::default()).unwrap();
    let m = BaseModel::load(&merged, &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = (1..12).collect();
    let logits = |model: &BaseModel| {
        let mut cache = model.decoder.new_cache();
        model.decoder.forward_last(&ids, &mut cache).unwrap()
    };
    let (lw, lm, lp) = (logits(&with), logits(&m), logits(&plain));
    let moved = max_abs_diff(&lw, &lp);
    assert!(
        moved > 1e-2,
        "{arch:?}: the adapter does not move the logits ({moved})"
    );
    let err = max_abs_diff(&lw, &lm);
    assert!(
        err < 1e-3 * moved.max(1.0),
        "{arch:?}: merged logits differ by {err} (the adapter moves them by {moved})"
    );

    // LoRA GGUF, as llama.cpp reads it.
    let lora = work.path().join("lora.gguf");
    write_lora_gguf(&adapter, &tiny.cfg, "test", &lora).unwrap();
    let (content, tensors) = dense(&lora);
    let md = &content.metadata;
    let s = |k: &str| md[k].to_string().unwrap().clone();
    assert_eq!(s("general.architecture"), arch.as_str());
    assert_eq!(s("general.type"), "adapter");
    assert_eq!(s("adapter.type"), "lora");
    let alpha = md["adapter.lora.alpha"].to_f32().unwrap();
    assert!(
        (f64::from(alpha) - scaling * 4.0).abs() < 1e-5,
        "alpha {alpha}"
    );
    let (_, base_w) = dense(&base);
    let (_, merged_w) = dense(&merged);
    let mut pairs = 0;
    for layer in 0..tiny.cfg.num_layers {
        for module in Module::ALL {
            let w = format!("blk.{layer}.{}.weight", module.gguf_name());
            let a = &content.tensor_infos[&format!("{w}.lora_a")];
            let b = &content.tensor_infos[&format!("{w}.lora_b")];
            // candle lists dims outermost first: ggml ne reversed.
            let (out, inp) = module.dims(&tiny.cfg);
            assert_eq!(a.shape.dims(), [4, inp], "{w} lora_a");
            assert_eq!(b.shape.dims(), [out, 4], "{w} lora_b");
            let r = b.shape.dims()[1] as f64;
            let ta = &tensors[&format!("{w}.lora_a")];
            let tb = &tensors[&format!("{w}.lora_b")];
            let delta = (tb.matmul(ta).unwrap() * (f64::from(alpha) / r)).unwrap();
            let want = (&merged_w[&w] - &base_w[&w]).unwrap();
            let err = max_abs_diff(&delta, &want);
            assert!(err < 1e-4, "{arch:?} {w}: LoRA GGUF delta differs by {err}");
            pairs += 1;
        }
    }
    assert_eq!(content.tensor_infos.len(), 2 * pairs);
    // Smaller files round the same sum: F16 and Q8_0 stay close to F32 and are smaller.
    let mut last = std::fs::metadata(&merged).unwrap().len();
    for (t, tol) in [(MergedType::F16, 1e-2), (MergedType::Q8_0, 5e-2)] {
        let small = work.path().join(format!("merged-{t:?}.gguf"));
        write_merged_gguf(&base, &adapter, "test", t, &small).unwrap();
        let size = std::fs::metadata(&small).unwrap().len();
        assert!(size < last, "{t:?}: {size} bytes, not below {last}");
        last = size;
        let (_, small_w) = dense(&small);
        for (name, w) in &merged_w {
            let err = max_abs_diff(w, &small_w[name]);
            let scale = max_abs_diff(w, &(w * 0.0).unwrap()).max(1e-6);
            assert!(
                err <= tol * scale,
                "{t:?} {name}: off by {err} (weights up to {scale})"
            );
        }
    }
    // Every other tensor of the merged file is the base file's.
    for (name, t) in &base_w {
        if !content.tensor_infos.contains_key(&format!("{name}.lora_a")) {
            assert_eq!(max_abs_diff(t, &merged_w[name]), 0.0, "{name}");
        }
    }
}

#[test]
fn llama_exports_agree_with_the_adapter_applied() {
    check(Arch::Llama, false);
}

#[test]
fn qwen2_exports_agree_with_the_adapter_applied_rslora() {
    check(Arch::Qwen2, true);
}

#[test]
fn an_adapter_of_another_model_is_refused_and_the_output_is_untouched() {
    let work = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(Arch::Llama, 1).unwrap();
    let base = work.path().join("base.gguf");
    tiny.write_gguf(&base).unwrap();
    let mut shape = tiny.cfg.adapter_shape(4, &["q_proj".to_string()]).unwrap();
    shape.modules.get_mut("q_proj").unwrap().out_features += 2;
    let wrong = random_adapter(&shape, 8.0, 1).unwrap();
    let out = work.path().join("out.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let e = write_merged_gguf(&base, &wrong, "x", MergedType::F32, &out).unwrap_err();
    assert!(e.to_string().contains("q_proj"), "{e}");
    let e = write_lora_gguf(&wrong, &tiny.cfg, "x", &out).unwrap_err();
    assert!(e.to_string().contains("q_proj"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let leftovers = std::fs::read_dir(work.path()).unwrap().count();
    assert_eq!(leftovers, 2, "a temp file was left behind");
}
