//! PEFT adapter I/O: canonical bytes, round trips of PEFT directories, interop with the
//! safetensors crate and Python's safetensors, shape checks, and refusal of malformed input.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Result;
use hivemind_model::adapter::{
    parse_safetensors, AdapterConfig, AdapterError, AdapterShape, Limits, LoraAdapter, LoraSide,
    LoraTensor, ModuleDims, TargetModules, CONFIG_FILE, WEIGHTS_FILE,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

/// (module kind, path group, out, in) of the tiny model used here.
const MODULES: [(&str, &str, usize, usize); 2] =
    [("q_proj", "self_attn", 4, 6), ("down_proj", "mlp", 6, 5)];
const LAYERS: usize = 2;
const RANK: usize = 2;

fn path(layer: usize, group: &str, module: &str) -> String {
    format!("model.layers.{layer}.{group}.{module}")
}

fn tiny_tensors(seed: u64) -> BTreeMap<String, LoraTensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for layer in 0..LAYERS {
        for (module, group, out, inp) in MODULES {
            let p = path(layer, group, module);
            let mut t = |rows: usize, cols: usize| LoraTensor {
                shape: vec![rows, cols],
                data: (0..rows * cols)
                    .map(|_| rng.gen_range(-1.0f32..1.0))
                    .collect(),
            };
            tensors.insert(LoraAdapter::tensor_name(&p, LoraSide::A), t(RANK, inp));
            tensors.insert(LoraAdapter::tensor_name(&p, LoraSide::B), t(out, RANK));
        }
    }
    tensors
}

fn tiny_config() -> AdapterConfig {
    AdapterConfig::new(
        RANK,
        4.0,
        TargetModules::from_names(["q_proj", "down_proj"]),
    )
}

fn tiny_adapter(seed: u64) -> LoraAdapter {
    LoraAdapter::new(tiny_config(), tiny_tensors(seed)).expect("valid adapter")
}

fn tiny_shape() -> AdapterShape {
    AdapterShape {
        rank: RANK,
        num_layers: LAYERS,
        modules: MODULES
            .iter()
            .map(|&(m, _, out_features, in_features)| {
                (
                    m.to_string(),
                    ModuleDims {
                        out_features,
                        in_features,
                    },
                )
            })
            .collect(),
    }
}

/// A safetensors file with a hand-written header (no padding) and raw data.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// One valid pair: A [1, 2] at [0, 8), B [3, 1] at [8, 20).
fn one_pair_header(a_extra: &str, b_offsets: &str) -> String {
    format!(
        r#"{{"{A}":{{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]{a_extra}}},"{B}":{{"dtype":"F32","shape":[3,1],"data_offsets":{b_offsets}}}}}"#
    )
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, LoraTensor>, AdapterError> {
    parse_safetensors(bytes, &Limits::DEFAULT)
}

#[test]
fn canonical_bytes_have_the_documented_layout() -> Result<()> {
    let mut tensors = BTreeMap::new();
    tensors.insert(
        B.to_string(),
        LoraTensor {
            shape: vec![3, 1],
            data: vec![0.5, -1.0, 2.0],
        },
    );
    tensors.insert(
        A.to_string(),
        LoraTensor {
            shape: vec![1, 2],
            data: vec![1.0, -0.25],
        },
    );
    let config = AdapterConfig::new(1, 1.0, TargetModules::from_names(["q_proj"]));
    let bytes = LoraAdapter::new(config, tensors)?.to_safetensors_bytes()?;

    // Written out by hand from the layout in the `adapter` module docs.
    let json = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"{A}":{{"data_offsets":[0,8],"dtype":"F32","shape":[1,2]}},"{B}":{{"data_offsets":[8,20],"dtype":"F32","shape":[3,1]}}}}"#
    );
    let padded = format!("{json:<width$}", width = json.len().div_ceil(8) * 8);
    let mut expected = (padded.len() as u64).to_le_bytes().to_vec();
    expected.extend_from_slice(padded.as_bytes());
    expected.extend_from_slice(&f32_bytes(&[1.0, -0.25, 0.5, -1.0, 2.0]));
    assert_eq!(String::from_utf8_lossy(&bytes[8..8 + padded.len()]), padded);
    assert_eq!(bytes, expected);
    assert_eq!((8 + padded.len()) % 8, 0, "data starts 8-byte aligned");

    // The safetensors crate reads it back, metadata included.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let want_meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    assert_eq!(meta.metadata().as_ref(), Some(&want_meta));
    Ok(())
}

#[test]
fn canonical_output_parses_with_the_safetensors_crate() -> Result<()> {
    let adapter = tiny_adapter(7);
    let bytes = adapter.to_safetensors_bytes()?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    assert_eq!(st.len(), adapter.tensors.len());
    for (name, t) in &adapter.tensors {
        let view = st.tensor(name)?;
        assert_eq!(view.dtype(), Dtype::F32);
        assert_eq!(view.shape(), t.shape.as_slice());
        assert_eq!(view.data(), f32_bytes(&t.data).as_slice(), "{name}");
    }
    // And our own parser gives back the same adapter.
    let again = LoraAdapter::from_safetensors_bytes(tiny_config(), &bytes, &Limits::DEFAULT)?;
    assert_eq!(again, adapter);
    assert_eq!(again.to_safetensors_bytes()?, bytes);
    Ok(())
}

#[test]
fn python_safetensors_reads_canonical_output() -> Result<()> {
    let probe = Command::new("python3")
        .args(["-c", "import safetensors.numpy, numpy"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with safetensors and numpy is not available");
        return Ok(());
    }
    let adapter = tiny_adapter(11);
    let dir = tempfile::tempdir()?;
    adapter.write_dir(dir.path())?;
    let script = r#"
import json, sys
from safetensors import safe_open
out = {"metadata": None, "tensors": {}}
with safe_open(sys.argv[1], framework="np") as f:
    out["metadata"] = f.metadata()
    for k in f.keys():
        t = f.get_tensor(k)
        out["tensors"][k] = {"dtype": str(t.dtype), "shape": list(t.shape),
                             "hex": t.astype("<f4").tobytes().hex()}
print(json.dumps(out))
"#;
    let file = dir.path().join(WEIGHTS_FILE);
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["metadata"], serde_json::json!({"format": "pt"}));
    let tensors = v["tensors"].as_object().expect("tensors object");
    assert_eq!(tensors.len(), adapter.tensors.len());
    for (name, t) in &adapter.tensors {
        let p = &tensors[name];
        assert_eq!(p["dtype"], "float32");
        assert_eq!(p["shape"], serde_json::json!(t.shape));
        // The values as numpy sees them, compared bit for bit (hex of little-endian f32).
        assert_eq!(p["hex"], hex::encode(f32_bytes(&t.data)), "{name}");
    }
    Ok(())
}

/// An `adapter_config.json` as PEFT 0.13 writes it (unsorted set, integer alpha, many
/// fields HiveMind does not interpret).
const PEFT_CONFIG: &str = r#"{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 4,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 2,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "q_proj",
    "down_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}"#;

/// Safetensors bytes as another writer (the safetensors crate, header keys in its own
/// order) produces them, from `(name, dtype, shape, raw bytes)`.
fn foreign_file(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    Ok(safetensors::tensor::serialize(views, meta)?)
}

#[test]
fn peft_dir_round_trips() -> Result<()> {
    let src = tempfile::tempdir()?;
    let tensors = tiny_tensors(3);
    let foreign: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)))
        .collect();
    std::fs::write(src.path().join(WEIGHTS_FILE), foreign_file(&foreign)?)?;
    std::fs::write(src.path().join(CONFIG_FILE), PEFT_CONFIG)?;

    let adapter = LoraAdapter::read_dir(src.path())?;
    assert_eq!(adapter.tensors, tensors);
    let c = &adapter.config;
    assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (2, 4.0, 0.05));
    assert_eq!(c.scaling(), 2.0);
    assert_eq!(
        c.target_modules.names(),
        Some(&["down_proj".to_string(), "q_proj".to_string()][..])
    );
    assert_eq!(
        c.base_model_name_or_path.as_deref(),
        Some("HuggingFaceTB/SmolLM2-135M-Instruct")
    );
    assert_eq!(c.extra["megatron_core"], "megatron.core");
    adapter.check_shape(&tiny_shape())?;

    let out = tempfile::tempdir()?;
    adapter.write_dir(out.path())?;
    let again = LoraAdapter::read_dir(out.path())?;
    assert_eq!(again, adapter);
    // Every PEFT field survives with its value; only the set's order is canonical.
    let original: serde_json::Value = serde_json::from_str(PEFT_CONFIG)?;
    let mut written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join(CONFIG_FILE))?)?;
    assert_eq!(
        written["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );
    assert_eq!(
        written["lora_alpha"],
        serde_json::json!(4),
        "integer alpha stays an integer"
    );
    written["target_modules"] = original["target_modules"].clone();
    assert_eq!(written, original);
    // Writing is idempotent and leaves no temporary files.
    let first = std::fs::read(out.path().join(WEIGHTS_FILE))?;
    again.write_dir(out.path())?;
    assert_eq!(std::fs::read(out.path().join(WEIGHTS_FILE))?, first);
    let mut names: Vec<_> = std::fs::read_dir(out.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
    Ok(())
}

#[test]
fn peft_names_with_adapter_name_and_half_dtypes_are_accepted() -> Result<()> {
    // Values exactly representable in f16 and bf16, so the expected f32 values are exact.
    let a_vals = [0.5f32, -1.25, 3.0, 0.0, -0.125, 2.0];
    let b_vals = [1.0f32, -2.0, 0.75, -0.5, 4.0, 0.25, -3.0, 1.5];
    let f16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let bf16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect()
    };
    let p = "base_model.model.model.layers.0.self_attn.q_proj";
    let file = foreign_file(&[
        (
            format!("{p}.lora_A.default.weight"),
            Dtype::F16,
            vec![2, 3],
            f16(&a_vals),
        ),
        (
            format!("{p}.lora_B.default.weight"),
            Dtype::BF16,
            vec![4, 2],
            bf16(&b_vals),
        ),
    ])?;
    let tensors = parse(&file)?;
    let names: Vec<_> = tensors.keys().cloned().collect();
    assert_eq!(
        names,
        [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")]
    );
    assert_eq!(
        tensors[&names[0]],
        LoraTensor {
            shape: vec![2, 3],
            data: a_vals.to_vec()
        }
    );
    assert_eq!(
        tensors[&names[1]],
        LoraTensor {
            shape: vec![4, 2],
            data: b_vals.to_vec()
        }
    );

    // Both spellings of one tensor in the same file is a duplicate.
    let dup = foreign_file(&[
        (
            format!("{p}.lora_A.default.weight"),
            Dtype::F32,
            vec![1, 1],
            f32_bytes(&[1.0]),
        ),
        (
            format!("{p}.lora_A.weight"),
            Dtype::F32,
            vec![1, 1],
            f32_bytes(&[1.0]),
        ),
        (
            format!("{p}.lora_B.weight"),
            Dtype::F32,
            vec![1, 1],
            f32_bytes(&[1.0]),
        ),
    ])?;
    assert!(
        matches!(parse(&dup), Err(AdapterError::DuplicateTensor { tensor }) if tensor == format!("{p}.lora_A.weight"))
    );
    Ok(())
}

#[test]
fn config_accepts_list_or_string_and_refuses_unsupported() -> Result<()> {
    let with = |patch: &str| -> String {
        let mut v: serde_json::Value = serde_json::from_str(PEFT_CONFIG).expect("json");
        let p: serde_json::Value = serde_json::from_str(patch).expect("patch");
        for (k, x) in p.as_object().expect("object") {
            v[k] = x.clone();
        }
        v.to_string()
    };
    let c = AdapterConfig::from_json(with(r#"{"target_modules": ".*\\.(q|v)_proj"}"#).as_bytes())?;
    assert_eq!(
        c.target_modules,
        TargetModules::Pattern(r".*\.(q|v)_proj".into())
    );
    let back: serde_json::Value = serde_json::from_slice(&c.to_json()?)?;
    assert_eq!(
        back["target_modules"], r".*\.(q|v)_proj",
        "a pattern stays a string"
    );
    let c = AdapterConfig::from_json(
        with(r#"{"use_rslora": true, "r": 16, "lora_alpha": 8}"#).as_bytes(),
    )?;
    assert_eq!(c.scaling(), 2.0, "rsLoRA: alpha / sqrt(r)");
    let c = AdapterConfig::from_json(with(r#"{"lora_alpha": 2.5}"#).as_bytes())?;
    assert_eq!(c.scaling(), 1.25);

    for (patch, field) in [
        (r#"{"peft_type": "IA3"}"#, "peft_type"),
        (r#"{"r": 0}"#, "r"),
        (r#"{"bias": "all"}"#, "bias"),
        (r#"{"fan_in_fan_out": true}"#, "fan_in_fan_out"),
        (r#"{"use_dora": true}"#, "use_dora"),
        (r#"{"rank_pattern": {"q_proj": 8}}"#, "rank_pattern"),
        (r#"{"target_modules": []}"#, "target_modules"),
        (r#"{"lora_dropout": 1.5}"#, "lora_dropout"),
    ] {
        let err = AdapterConfig::from_json(with(patch).as_bytes()).expect_err(patch);
        assert!(
            matches!(&err, AdapterError::InvalidConfig { field: f, .. } if *f == field),
            "{patch}: {err}"
        );
    }
    assert!(matches!(
        AdapterConfig::from_json(b"{\"r\": 2}"),
        Err(AdapterError::ConfigJson { .. })
    ));
    Ok(())
}

#[test]
fn check_shape_names_the_tensor_and_both_shapes() -> Result<()> {
    let adapter = tiny_adapter(5);
    let shape = tiny_shape();
    adapter.check_shape(&shape)?;

    let mut wrong = shape.clone();
    wrong.modules.insert(
        "q_proj".into(),
        ModuleDims {
            out_features: 4,
            in_features: 7,
        },
    );
    let err = adapter.check_shape(&wrong).expect_err("in_features differ");
    let msg = err.to_string();
    assert!(
        matches!(&err, AdapterError::ShapeMismatch { tensor, expected, actual }
            if tensor == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            && expected == &[2, 7] && actual == &[2, 6]),
        "{err:?}"
    );
    assert!(
        msg.contains("q_proj.lora_A.weight") && msg.contains("[2, 7]") && msg.contains("[2, 6]"),
        "{msg}"
    );

    let mut wrong = shape.clone();
    wrong.rank = 4;
    assert!(matches!(
        adapter.check_shape(&wrong),
        Err(AdapterError::ConfigMismatch { field: "r", .. })
    ));

    let mut wrong = shape.clone();
    wrong.num_layers = 3;
    assert!(matches!(
        adapter.check_shape(&wrong),
        Err(AdapterError::MissingModule { layer: 2, .. })
    ));
    wrong.num_layers = 1;
    assert!(matches!(
        adapter.check_shape(&wrong),
        Err(AdapterError::LayerOutOfRange {
            layer: 1,
            num_layers: 1,
            ..
        })
    ));

    let mut wrong = shape.clone();
    wrong.modules.insert(
        "v_proj".into(),
        ModuleDims {
            out_features: 2,
            in_features: 6,
        },
    );
    assert!(matches!(
        adapter.check_shape(&wrong),
        Err(AdapterError::ConfigMismatch {
            field: "target_modules",
            ..
        })
    ));

    // With a pattern config, the tensors alone decide: an unknown module kind is named.
    let mut patterned = adapter.clone();
    patterned.config.target_modules = TargetModules::Pattern(".*".into());
    patterned.check_shape(&shape)?;
    let mut wrong = shape.clone();
    wrong.modules.remove("down_proj");
    assert!(
        matches!(patterned.check_shape(&wrong), Err(AdapterError::UnexpectedModule { module, .. }) if module == "down_proj")
    );
    Ok(())
}

#[test]
fn in_memory_adapters_are_validated() {
    let mut tensors = tiny_tensors(1);
    let name = tensors.keys().next().expect("a tensor").clone();
    tensors.get_mut(&name).expect("present").data.pop();
    let adapter = LoraAdapter {
        config: tiny_config(),
        tensors,
    };
    assert!(matches!(
        adapter.to_safetensors_bytes(),
        Err(AdapterError::DataLength { .. })
    ));

    let mut tensors = tiny_tensors(1);
    tensors.get_mut(&name).expect("present").data[3] = f32::NAN;
    assert!(matches!(
        LoraAdapter::new(tiny_config(), tensors),
        Err(AdapterError::NonFinite { index: 3, .. })
    ));

    let mut config = tiny_config();
    config.r = 3;
    assert!(matches!(
        LoraAdapter::new(config, tiny_tensors(1)),
        Err(AdapterError::RankMismatch {
            expected: 3,
            actual: 2,
            ..
        })
    ));
}

#[test]
fn malformed_files_are_refused() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    let good = raw_file(&one_pair_header("", "[8,20]"), &data);
    assert_eq!(parse(&good).expect("the base case is valid").len(), 2);

    // Truncated: anywhere in the length prefix, the header or the data.
    for cut in [0, 5, 8, 30, good.len() - 21, good.len() - 1] {
        let err = parse(&good[..cut]).expect_err("truncated");
        assert!(
            matches!(
                err,
                AdapterError::Truncated { .. } | AdapterError::DataOutOfRange { .. }
            ),
            "cut at {cut}: {err:?}"
        );
    }
    let mut lying_len = good.clone();
    lying_len[..8].copy_from_slice(&10_000u64.to_le_bytes());
    assert!(matches!(
        parse(&lying_len),
        Err(AdapterError::Truncated { needed: 10_008, .. })
    ));

    /// A named malformed file and the check its parse error must pass.
    type Case = (&'static str, Vec<u8>, fn(&AdapterError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "trailing bytes",
            raw_file(
                &one_pair_header("", "[8,20]"),
                &[data.clone(), vec![0; 4]].concat(),
            ),
            |e| matches!(e, AdapterError::TrailingBytes { extra: 4 }),
        ),
        (
            "overlap",
            raw_file(&one_pair_header("", "[4,16]"), &data),
            |e| matches!(e, AdapterError::BadOffsets { reason, .. } if reason.contains("overlap")),
        ),
        (
            "gap",
            raw_file(
                &one_pair_header("", "[12,24]"),
                &[data.clone(), vec![0; 4]].concat(),
            ),
            |e| matches!(e, AdapterError::BadOffsets { reason, .. } if reason.contains("gap")),
        ),
        (
            "reversed",
            raw_file(&one_pair_header("", "[20,8]"), &data),
            |e| matches!(e, AdapterError::BadOffsets { reason, .. } if reason.contains("before")),
        ),
        (
            "out of range",
            raw_file(&one_pair_header("", "[8,20]"), &data[..16]),
            |e| {
                matches!(
                    e,
                    AdapterError::DataOutOfRange {
                        end: 20,
                        data_len: 16,
                        ..
                    }
                )
            },
        ),
        (
            "size lies about the shape",
            raw_file(
                &one_pair_header("", "[8,24]"),
                &[data.clone(), vec![0; 4]].concat(),
            ),
            |e| {
                matches!(
                    e,
                    AdapterError::SizeMismatch {
                        expected: 12,
                        actual: 16,
                        ..
                    }
                )
            },
        ),
        (
            "dtype lies about the size",
            raw_file(
                &one_pair_header("", "[8,20]").replacen("F32", "F16", 1),
                &data,
            ),
            |e| {
                matches!(
                    e,
                    AdapterError::SizeMismatch {
                        expected: 4,
                        actual: 8,
                        ..
                    }
                )
            },
        ),
        (
            "unsupported dtype",
            raw_file(
                &one_pair_header("", "[8,20]").replacen("F32", "I32", 1),
                &data,
            ),
            |e| matches!(e, AdapterError::UnsupportedDtype { dtype, .. } if dtype == "I32"),
        ),
        (
            "unknown field",
            raw_file(&one_pair_header(r#","extra":1"#, "[8,20]"), &data),
            |e| matches!(e, AdapterError::InvalidHeader { .. }),
        ),
        (
            "negative offset",
            raw_file(&one_pair_header("", "[-8,20]"), &data),
            |e| matches!(e, AdapterError::InvalidHeader { .. }),
        ),
        ("not JSON", raw_file("{\"a\":", &data), |e| {
            matches!(e, AdapterError::InvalidHeader { .. })
        }),
        ("not an object", raw_file("[1,2,3]", &data), |e| {
            matches!(e, AdapterError::InvalidHeader { .. })
        }),
        (
            "not UTF-8",
            {
                let mut f = raw_file(r#"{"x":1}"#, &data);
                f[10] = 0xff;
                f
            },
            |e| matches!(e, AdapterError::InvalidHeader { .. }),
        ),
        (
            "JSON after the header",
            raw_file(&format!("{} {{}}", one_pair_header("", "[8,20]")), &data),
            |e| matches!(e, AdapterError::InvalidHeader { .. }),
        ),
        (
            "non-string metadata",
            raw_file(
                &one_pair_header("", "[8,20]").replacen('{', r#"{"__metadata__":{"format":1},"#, 1),
                &data,
            ),
            |e| matches!(e, AdapterError::InvalidHeader { .. }),
        ),
        ("empty", raw_file("{}", &[]), |e| {
            matches!(e, AdapterError::NoTensors)
        }),
        (
            "duplicate key",
            raw_file(
                &format!(
                    r#"{{"{A}":{{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}},"{A}":{{"dtype":"F32","shape":[3,1],"data_offsets":[8,20]}}}}"#
                ),
                &data,
            ),
            |e| matches!(e, AdapterError::DuplicateTensor { .. }),
        ),
        (
            "non-LoRA name",
            raw_file(
                &one_pair_header("", "[8,20]").replace(B, "lm_head.weight"),
                &data,
            ),
            |e| matches!(e, AdapterError::NotLora { tensor } if tensor == "lm_head.weight"),
        ),
        (
            "missing B",
            raw_file(
                &format!(r#"{{"{A}":{{"dtype":"F32","shape":[1,5],"data_offsets":[0,20]}}}}"#),
                &data,
            ),
            |e| matches!(e, AdapterError::MissingPair { missing, .. } if missing == B),
        ),
        (
            "rank mismatch",
            raw_file(
                &format!(
                    r#"{{"{A}":{{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}},"{B}":{{"dtype":"F32","shape":[1,3],"data_offsets":[8,20]}}}}"#
                ),
                &data,
            ),
            |e| {
                matches!(
                    e,
                    AdapterError::RankMismatch {
                        expected: 1,
                        actual: 3,
                        ..
                    }
                )
            },
        ),
        (
            "1-D tensor",
            raw_file(
                &one_pair_header("", "[8,20]").replace("[3,1]", "[3]"),
                &data,
            ),
            |e| matches!(e, AdapterError::BadShape { .. }),
        ),
        (
            "zero dim",
            raw_file(
                &one_pair_header("", "[8,8]").replace("[3,1]", "[0,1]"),
                &data[..8],
            ),
            |e| matches!(e, AdapterError::BadShape { .. }),
        ),
        (
            "shape overflow",
            raw_file(
                &one_pair_header("", "[8,20]").replace("[3,1]", "[4611686018427387904,8]"),
                &data,
            ),
            |e| matches!(e, AdapterError::BadShape { .. }),
        ),
        (
            "NaN",
            raw_file(
                &one_pair_header("", "[8,20]"),
                &f32_bytes(&[1.0, 2.0, 3.0, f32::NAN, 5.0]),
            ),
            |e| matches!(e, AdapterError::NonFinite { index: 1, .. }),
        ),
        (
            "infinity",
            raw_file(
                &one_pair_header("", "[8,20]"),
                &f32_bytes(&[f32::INFINITY, 2.0, 3.0, 4.0, 5.0]),
            ),
            |e| matches!(e, AdapterError::NonFinite { index: 0, .. }),
        ),
    ];
    for (what, bytes, expected) in cases {
        match parse(&bytes) {
            Err(e) if expected(&e) => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
}

#[test]
fn limits_are_enforced_before_parsing() -> Result<()> {
    let bytes = tiny_adapter(2).to_safetensors_bytes()?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?);
    let limits = Limits::DEFAULT;
    parse_safetensors(&bytes, &limits)?;
    let small = Limits {
        max_bytes: bytes.len() as u64 - 1,
        ..limits
    };
    assert!(matches!(
        parse_safetensors(&bytes, &small),
        Err(AdapterError::TooLarge { .. })
    ));
    let small = Limits {
        max_header_bytes: header_len - 1,
        ..limits
    };
    assert!(matches!(
        parse_safetensors(&bytes, &small),
        Err(AdapterError::HeaderTooLarge { .. })
    ));
    let small = Limits {
        max_tensors: 7,
        ..limits
    };
    assert!(matches!(
        parse_safetensors(&bytes, &small),
        Err(AdapterError::TooManyTensors { count: 8, max: 7 })
    ));
    let exact = Limits {
        max_bytes: bytes.len() as u64,
        max_header_bytes: header_len,
        max_tensors: 8,
    };
    parse_safetensors(&bytes, &exact)?;

    // Reading a directory checks the file size before reading it.
    let dir = tempfile::tempdir()?;
    tiny_adapter(2).write_dir(dir.path())?;
    let small = Limits {
        max_bytes: 100,
        ..limits
    };
    assert!(matches!(
        LoraAdapter::read_dir_with_limits(dir.path(), &small),
        Err(AdapterError::TooLarge { len, max: 100 }) if len == bytes.len() as u64
    ));
    assert!(matches!(
        LoraAdapter::read_dir(dir.path().join("missing")),
        Err(AdapterError::Io { path, .. }) if path.ends_with(CONFIG_FILE)
    ));
    Ok(())
}

fn valid_bytes() -> Vec<u8> {
    tiny_adapter(9).to_safetensors_bytes().expect("valid")
}

/// Whatever the input, parsing returns (never panics), and anything accepted is a valid
/// adapter that re-serialises canonically.
fn parse_is_total(bytes: &[u8]) {
    let limits = Limits {
        max_bytes: 1 << 20,
        max_tensors: 64,
        max_header_bytes: 1 << 16,
    };
    if let Ok(tensors) = parse_safetensors(bytes, &limits) {
        let r = tensors.values().next().map_or(1, |t| t.shape[0]);
        let config = AdapterConfig::new(r, 1.0, TargetModules::Pattern(".*".into()));
        if let Ok(a) = LoraAdapter::new(config, tensors) {
            let canon = a.to_safetensors_bytes().expect("valid adapters serialise");
            assert_eq!(
                parse_safetensors(&canon, &limits).expect("canonical parses"),
                a.tensors
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = valid_bytes();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        parse_is_total(&bytes);
    }

    #[test]
    fn mutated_headers_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(
            b"{}[],:\"0123456789-eE.FB16 ".to_vec())), 1..6),
    ) {
        // Edits confined to the header, with JSON-ish bytes, so the JSON often still parses
        // and the offset/shape/dtype checks are what is exercised.
        let mut bytes = valid_bytes();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        for (i, b) in edits {
            let i = 8 + i.index(header_len);
            bytes[i] = b;
        }
        parse_is_total(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..256), len in 0u64..300) {
        if bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&len.to_le_bytes());
        }
        parse_is_total(&bytes);
    }
}
