#!/usr/bin/env python3
"""Greedy-decoding reference fixtures for HiveMind's Rust decoder, made with Hugging Face transformers.

transformers loads the same GGUF file the Rust side loads (`from_pretrained(dir, gguf_file=...)`),
dequantizes every tensor to float32 and un-permutes llama q/k rows into the Hugging Face layout. For
each prompt this script records the input ids, the last prompt position's top-5 logits, and the first
N greedy (argmax) generated ids, so `model/tests` can check tokenizer, loader and decoder against an
implementation that shares no code with ours.

Greedy here means plain argmax at every step: transformers' `generate(do_sample=False,
repetition_penalty=1.0, eos_token_id=None)`, which neither stops at nor suppresses EOS (an EOS id is
recorded like any other id; `first_eos_index` says where the first one is). generate() decodes with a
KV cache; the script checks its ids against one uncached teacher-forced forward over prompt + output
and fails if any argmax differs. `step_margins` holds top1 - top2 logit at each generated step and
`step_runner_up_ids` the top-2 id: a step with a tiny margin is where a quantized Rust matmul may
legitimately pick the runner-up, after which the two sequences diverge.

Regenerate (CPU only; a few minutes on 2 cores):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install -r tools/reference/requirements-hf.txt
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tools/reference/hf_greedy.py \\
        --model ~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out model/tests/fixtures/greedy_smollm2.json

Prompts contain no digits: transformers' GGUF tokenizer conversion is not a trustworthy reference for
SmolLM2's digit splitting, so digit-free text keeps the tokenizer half of the fixture valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# (name, kind, language, text). For kind "chat", text is the user message; the prompt is the model's
# chat template rendered with add_generation_prompt=True.
PROMPTS = [
    ("en_capital", "plain", "en", "The capital of France is"),
    ("en_robot", "plain", "en", "Once upon a time, there was a little robot who"),
    ("en_photosynthesis", "plain", "en", "Photosynthesis is the process by which plants"),
    ("en_recipe", "plain", "en", "To make a good cup of tea, you should"),
    ("zh_capital", "plain", "zh", "中国的首都是"),
    ("zh_mountain", "plain", "zh", "从前有一座山，山上有"),
    ("chat_en_federated", "chat", "en", "What is federated learning?"),
    ("chat_zh_who", "chat", "zh", "你是谁？"),
]

TOP_K = 5


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_add_bos(path: Path) -> bool:
    """Reads tokenizer.ggml.add_bos_token straight from the GGUF (absent means False)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def r4(x: float) -> float:
    return round(float(x), 4)


def top_k(logits: torch.Tensor, tok, k: int = TOP_K) -> list[dict]:
    vals, ids = torch.topk(logits, k)
    return [
        {"id": int(i), "logit": r4(v), "token": tok.convert_ids_to_tokens(int(i))}
        for v, i in zip(vals.tolist(), ids.tolist())
    ]


@torch.inference_mode()
def greedy_generate(model, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy search: do_sample=False, no repetition penalty, and eos_token_id=None so
    that it neither stops at nor suppresses EOS (min_new_tokens would suppress it and change the ids)."""
    inp = torch.tensor([ids])
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        do_sample=False,
        num_beams=1,
        max_new_tokens=n,
        repetition_penalty=1.0,
        eos_token_id=None,
    )
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def teacher_forced(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    """One uncached forward over prompt + generated ids. Row i holds the logits that chose gen[i]; with a
    causal mask they must equal generate()'s cached step logits, so this independently checks the ids."""
    seq = torch.tensor([ids + gen[:-1]])
    return model(input_ids=seq, use_cache=False).logits[0, len(ids) - 1 :].float()


def to_json(obj, indent: int = 0) -> str:
    """Pretty JSON with scalar lists and flat dicts of scalars kept on one line."""
    pad = "  " * indent

    def scalar(x) -> bool:
        return not isinstance(x, (list, dict))

    if isinstance(obj, list):
        if all(scalar(x) for x in obj):
            return json.dumps(obj, ensure_ascii=False)
        inner = ",\n".join(pad + "  " + to_json(x, indent + 1) for x in obj)
        return "[\n" + inner + "\n" + pad + "]"
    if isinstance(obj, dict):
        if obj and all(scalar(v) for v in obj.values()) and len(obj) <= 4:
            return json.dumps(obj, ensure_ascii=False)
        inner = ",\n".join(
            pad + "  " + json.dumps(k, ensure_ascii=False) + ": " + to_json(v, indent + 1)
            for k, v in obj.items()
        )
        return "{\n" + inner + "\n" + pad + "}"
    return json.dumps(obj, ensure_ascii=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="path to the GGUF file")
    ap.add_argument("--out", type=Path, required=True, help="fixture JSON to write")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument(
        "--expect-sha256",
        default=DEFAULT_SHA256,
        help="refuse a model with another hash ('' to skip the check)",
    )
    args = ap.parse_args()

    t0 = time.perf_counter()
    model_path = args.model.expanduser().resolve()
    digest = sha256_file(model_path)
    if args.expect_sha256 and digest != args.expect_sha256:
        print(f"error: {model_path} has sha256 {digest}, expected {args.expect_sha256}", file=sys.stderr)
        return 1
    add_bos = gguf_add_bos(model_path)

    torch.manual_seed(0)  # greedy decoding uses no randomness; fixed anyway
    d, f = str(model_path.parent), model_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    t_loaded = time.perf_counter()

    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if bool(cfg.tie_word_embeddings) != tied:
        print("error: config.tie_word_embeddings disagrees with the loaded weights", file=sys.stderr)
        return 1

    records = []
    for name, kind, lang, text in PROMPTS:
        if kind == "chat":
            messages = [{"role": "user", "content": text}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = text
        if re.search(r"\d", prompt):
            print(f"error: prompt {name!r} contains a digit", file=sys.stderr)
            return 1
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if add_bos:
            ids = [tok.bos_token_id] + ids
        if kind == "chat":
            templ = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            templ_ids = templ["input_ids"] if isinstance(templ, dict) or hasattr(templ, "keys") else templ
            if list(templ_ids) != ids:
                print(f"error: {name}: apply_chat_template ids differ from encoding the text", file=sys.stderr)
                return 1
        if tok.decode(ids, skip_special_tokens=False) != prompt:
            print(f"error: {name}: ids do not round-trip to the prompt text", file=sys.stderr)
            return 1

        gen = greedy_generate(model, ids, args.new_tokens)
        if len(gen) != args.new_tokens:
            print(f"error: {name}: generate() returned {len(gen)} ids", file=sys.stderr)
            return 1
        steps = teacher_forced(model, ids, gen)
        top2 = torch.topk(steps, 2, dim=-1)
        if top2.indices[:, 0].tolist() != gen:
            print(f"error: {name}: generate() ids differ from the uncached argmax:\n{gen}\n"
                  f"{top2.indices[:, 0].tolist()}", file=sys.stderr)
            return 1
        prompt_logits = steps[0]
        margins = [r4(a - b) for a, b in top2.values.tolist()]
        runner_up = top2.indices[:, 1].tolist()
        eos = tok.eos_token_id
        rec = {
            "name": name,
            "kind": kind,
            "language": lang,
        }
        if kind == "chat":
            rec["user_message"] = text
        rec.update(
            {
                "prompt": prompt,
                "input_ids": ids,
                "prompt_top5": top_k(prompt_logits, tok),
                "generated_ids": gen,
                "generated_text": tok.decode(gen, skip_special_tokens=False),
                "first_eos_index": gen.index(eos) if eos in gen else None,
                "step_margins": margins,
                "step_runner_up_ids": runner_up,
                "min_margin_first_32": min(margins[:32]),
            }
        )
        if name == PROMPTS[0][0]:
            lg = prompt_logits.double()
            rec["prompt_logits_summary"] = {
                "argmax": int(torch.argmax(prompt_logits)),
                "mean_abs": round(float(lg.abs().mean()), 6),
                "max_abs": round(float(lg.abs().max()), 6),
                "mean": round(float(lg.mean()), 6),
            }
        records.append(rec)
        print(f"[{name}] {prompt!r}\n  -> {rec['generated_text']!r}", file=sys.stderr)

    t_done = time.perf_counter()
    command = (
        "HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tools/reference/hf_greedy.py "
        "--model ~/.cache/hivemind/models/" + model_path.name + " --out model/tests/fixtures/" + args.out.name
    )
    fixture = {
        "header": {
            "generator": "tools/reference/hf_greedy.py",
            "command": command,
            "setup": "python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install -r tools/reference/requirements-hf.txt",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": gguf.__version__ if hasattr(gguf, "__version__") else _dist_version("gguf"),
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "device": "cpu",
            "dtype": "float32",
            "model_file": model_path.name,
            "model_sha256": digest,
            "decoding": "argmax at every step; no sampling, no repetition penalty, no EOS stop",
            "new_tokens": args.new_tokens,
            "gguf_add_bos_token": add_bos,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "logit_rounding": "4 decimals (top5, step_margins), 6 decimals (prompt_logits_summary)",
        },
        "config": {
            "architecture": cfg.model_type,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "rope_theta": rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        },
        "prompts": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(fixture) + "\n", encoding="utf-8")
    print(
        f"wrote {args.out}: load {t_loaded - t0:.1f}s, decode {t_done - t_loaded:.1f}s, "
        f"total {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
