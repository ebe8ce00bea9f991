#!/usr/bin/env python3
"""PEFT interop check: HiveMind's LoRA adapters and Hugging Face PEFT's load in each other and decode alike.

Two directions, both on the default model (the SmolLM2-135M-Instruct Q4_1 GGUF that `hive-node`
loads; transformers dequantizes the same file to float32):

  ours -> PEFT   `hive-node train` makes an adapter (3 optimizer steps on the sample dataset, unless
                 `--adapter DIR` names one); Python loads it with `PeftModel.from_pretrained`.
  PEFT -> ours   PEFT makes a LoRA adapter (r=8, alpha=16 on q_proj, v_proj, down_proj, seeded random
                 A and B, B scaled by `--b-scale` so that the answers change visibly against the base
                 model; the script checks that they do) and saves it; `hive-node chat --adapter`
                 loads it.

For each prompt (English and Chinese chat messages, rendered with the model's chat template) both
sides decode greedily for `--new-tokens` tokens, stopping at an end-of-turn id: transformers'
`generate(do_sample=False, repetition_penalty=1.0)` on the PEFT model, and `hive-node chat
--temperature 0 --repeat-penalty 1 --prompt P`. The answers are compared as UTF-8 bytes, the HF side
split into its generated tokens (byte-level BPE pieces). Equal answers pass. Otherwise the first
differing byte names the HF generation step where the two diverged, and an uncached teacher-forced
forward over prompt + HF tokens gives that step's logits. HiveMind decodes with 4-bit weights and
16-bit-rounded activations, so a near-tie may go the other way: a divergence is allowed only where
the HF logit of its own pick exceeds the HF logit of every token that could have been ours (a token
whose bytes start our remaining answer, or an end-of-turn id where our answer ends) by less than
`--tie-margin` (default 0.05), which also bounds the step's top1 - top2 margin. Anything else is a
mismatch. (A different split into tokens of the very same bytes is not seen; it would not change the
answer text.)

Prints progress on stderr and one JSON summary line on stdout. Exits 1 on a mismatch, on an adapter
that does not move the first step's logits, on a trained adapter that changes no greedy answer
against the base model, or on a PEFT-made one that leaves any answer unchanged (--b-scale).

Run from the repository root (CPU only, a few minutes on 2 cores; the venv of
tools/reference/requirements-hf.txt, which pins peft; a built `hive-node`):

    cargo build --bin hive-node
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tools/reference/peft_interop.py \\
        --model ~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf

Not part of CI: torch is a multi-GB install.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

# Shared with the greedy fixture script in this directory: the model hash and its check, plain
# argmax generation, and the uncached teacher-forced step logits.
from hf_greedy import DEFAULT_SHA256, greedy_generate, sha256_file, teacher_forced

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = Path("~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# User messages; each is rendered with the model's chat template (default system prompt).
PROMPTS = [
    "What is federated learning?",
    "你是谁？",
    "Write a short poem about the sea.",
    "请简单介绍一下北京。",
]

# The end-of-turn tokens hive-node stops at (model/src/loader.rs `eos_ids`): the model's eos plus
# these names where the vocabulary has them.
END_NAMES = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character standing for each byte, mapped to it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tok) -> list[bytes]:
    """The UTF-8 bytes each id stands for in generated text; special tokens stand for nothing."""
    alphabet = byte_level_alphabet()
    special = set(tok.all_special_ids) | {int(i) for i in tok.added_tokens_decoder}
    out = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in special or piece is None:
            out.append(b"")
        elif all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        else:
            out.append(piece.encode("utf-8"))
    return out


class Side:
    """The Python half: tokenizer, byte table and greedy decoding with step logits."""

    def __init__(self, tok, end_ids: list[int], new_tokens: int):
        self.tok = tok
        self.end_ids = end_ids
        self.new_tokens = new_tokens
        self.bytes = token_bytes(tok)
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.bytes):
            if b:
                self.by_bytes.setdefault(b, []).append(i)
        self.longest = max(len(b) for b in self.bytes)
        self.base_cache: dict[str, tuple[list[int], torch.Tensor]] = {}

    def prompt_ids(self, message: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def greedy(self, model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """Greedy ids up to and including the first end-of-turn id, and each step's logits from one
        uncached teacher-forced forward (checked to pick the same ids)."""
        # Greedy decoding is prefix-stable: the ids up to the first end-of-turn id are those of a run
        # that stops there (as hive-node does).
        gen = greedy_generate(model, ids, self.new_tokens)
        for n, t in enumerate(gen):
            if t in self.end_ids:
                gen = gen[: n + 1]
                break
        steps = teacher_forced(model, ids, gen)
        if steps.argmax(-1).tolist() != gen:
            raise RuntimeError("generate() ids differ from the uncached argmax")
        return gen, steps

    def text_bytes(self, gen: list[int]) -> bytes:
        return b"".join(self.bytes[t] for t in gen)


def hive_chat(args, adapter: Path, message: str) -> tuple[bytes, dict]:
    cmd = [
        str(args.hive_node), "chat",
        "--model", str(args.model),
        "--prompt", message,
        "--temperature", "0",
        "--repeat-penalty", "1.0",
        "--max-new-tokens", str(args.new_tokens),
        "--stats",
        "--adapter", str(adapter),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
    out = p.stdout
    if out.endswith(b"\n"):  # `chat --prompt` ends the answer with one newline
        out = out[:-1]
    stats = {}
    for line in p.stderr.decode(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                stats = json.loads(line)
            except json.JSONDecodeError:
                pass
    return out, stats


def compare(side: Side, gen: list[int], steps: torch.Tensor, ours: bytes, tie_margin: float) -> dict:
    """Where our answer leaves the HF one, and whether that step was a near-tie."""
    hf = side.text_bytes(gen)
    rec = {"hf_tokens": len(gen), "hf_text": hf.decode("utf-8", "replace"),
           "ours_text": ours.decode("utf-8", "replace")}
    # Both sides write an unfinished UTF-8 character at the end as U+FFFD (hive-node's TokenStream
    # and Python's "replace" both replace each maximal invalid subpart with one).
    if hf.decode("utf-8", "replace").encode("utf-8") == ours:
        rec.update(result="exact", divergence_step=None)
        return rec
    c = next((i for i, (a, b) in enumerate(zip(hf, ours)) if a != b), min(len(hf), len(ours)))
    # The HF step whose bytes hold byte c.
    start, step = 0, None
    for n, t in enumerate(gen):
        end = start + len(side.bytes[t])
        if start <= c < end:
            step = n
            break
        start = end
    if step is None:
        # Our answer goes on where the HF one ends: at HF's end-of-turn step we did not stop.
        if gen[-1] not in side.end_ids:
            # HF ran out of tokens first: every byte it made is ours too, in other token splits.
            rec.update(result="prefix", divergence_step=None, matched_bytes=c)
            return rec
        step, start = len(gen) - 1, len(hf)
    rest = ours[start:]
    logits = steps[step]
    pick = gen[step]
    # Every token that could have been ours at this step.
    cands = set()
    if not rest:
        cands.update(side.end_ids)
    for n in range(1, min(len(rest), side.longest) + 1):
        cands.update(side.by_bytes.get(rest[:n], []))
    cands.discard(pick)
    top2 = torch.topk(logits, 2)
    margin = float(top2.values[0] - top2.values[1])
    if cands:
        best = max(cands, key=lambda t: float(logits[t]))
        gap = float(logits[pick] - logits[best])
    else:
        best, gap = None, float("inf")
    rec.update(
        result="tie" if gap < tie_margin else "MISMATCH",
        divergence_step=step,
        matched_bytes=c,
        hf_pick=side.tok.convert_ids_to_tokens(pick),
        our_pick=side.tok.convert_ids_to_tokens(best) if best is not None else None,
        step_margin=round(margin, 4),
        gap_to_our_pick=round(gap, 4),
    )
    return rec


def run_direction(name: str, model, adapter: Path, side: Side, args) -> dict:
    """Greedy answers of the PEFT model and of `hive-node chat --adapter`, prompt by prompt."""
    cases = []
    max_delta = 0.0
    changed = 0
    for message in PROMPTS:
        ids = side.prompt_ids(message)
        gen, steps = side.greedy(model, ids)
        if message not in side.base_cache:
            with model.disable_adapter():
                side.base_cache[message] = side.greedy(model, ids)
        base_gen, base_steps = side.base_cache[message]
        delta = float((steps[0] - base_steps[0]).abs().max())
        max_delta = max(max_delta, delta)
        t0 = time.perf_counter()
        ours, stats = hive_chat(args, adapter, message)
        rec = {"prompt": message}
        rec.update(compare(side, gen, steps, ours, args.tie_margin))
        rec["changed_vs_base"] = side.text_bytes(base_gen) != side.text_bytes(gen)
        rec["first_step_logit_delta_vs_base"] = round(delta, 4)
        rec["ours_generated_tokens"] = stats.get("generated_tokens")
        changed += rec["changed_vs_base"]
        log(f"[{name}] {message!r}: {rec['result']} (step {rec['divergence_step']}), "
            f"changed vs base: {rec['changed_vs_base']}, hive-node {time.perf_counter() - t0:.1f}s\n"
            f"  hf:   {rec['hf_text']!r}\n  ours: {rec['ours_text']!r}")
        if rec["result"] != "exact":
            log(f"  diverged at step {rec['divergence_step']}: hf {rec['hf_pick']!r} vs ours "
                f"{rec['our_pick']!r}, gap {rec['gap_to_our_pick']}, step margin {rec['step_margin']}")
        cases.append(rec)
    return {
        "adapter": str(adapter),
        "cases": cases,
        "exact": sum(c["result"] == "exact" for c in cases),
        "ties": sum(c["result"] == "tie" for c in cases),
        "prefixes": sum(c["result"] == "prefix" for c in cases),
        "mismatches": sum(c["result"] == "MISMATCH" for c in cases),
        "changed_vs_base": changed,
        "max_first_step_logit_delta_vs_base": round(max_delta, 4),
    }


def train_ours(args, work: Path) -> Path:
    """`hive-node train` on the sample dataset for a few steps; returns the adapter dir."""
    run_dir = work / "train"
    run_dir.mkdir()
    hn = str(args.hive_node)
    subprocess.run([hn, "train", "--create-sample"], cwd=run_dir, check=True, capture_output=True)
    out = work / "ours_adapter"
    cmd = [
        hn, "train",
        "--model", str(args.model),
        "--data", "data/sample_dataset.json",
        "--max-steps", str(args.train_steps),
        "--lr", str(args.lr),
        "--batch-size", "2",
        "--grad-accum", "1",
        "--max-seq-len", "128",
        "--output", str(out),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=run_dir, capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
    log(f"trained {out} in {time.perf_counter() - t0:.1f}s")
    return out


def make_peft(base, args, work: Path):
    """A seeded PEFT LoRA adapter with non-zero B, saved to a dir; returns (peft model, dir)."""
    torch.manual_seed(args.seed)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B (the default zeroes B: no effect at all)
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(args.b_scale)
    out = work / "peft_adapter"
    model.save_pretrained(str(out))
    return model.eval(), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the base model GGUF file")
    ap.add_argument("--hive-node", type=Path, default=REPO / "target" / "debug" / "hive-node",
                    help="the hive-node binary (default: target/debug/hive-node)")
    ap.add_argument("--adapter", type=Path, help="an adapter made by hive-node (default: train one)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tie-margin", type=float, default=0.05,
                    help="largest HF logit gap at which a divergence counts as a near-tie")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--b-scale", type=float, default=0.5, help="factor on PEFT's random lora_B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="compute threads for hive-node and torch")
    ap.add_argument("--keep", type=Path, help="keep the adapters and work files in this dir")
    ap.add_argument("--expect-sha256", default=DEFAULT_SHA256,
                    help="refuse a model with another hash ('' to skip the check)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    args.model = args.model.expanduser().resolve()
    args.hive_node = args.hive_node.expanduser().resolve()
    if not args.hive_node.exists():
        log(f"error: {args.hive_node} not found; run `cargo build --bin hive-node`")
        return 2
    digest = sha256_file(args.model)
    if args.expect_sha256 and digest != args.expect_sha256:
        log(f"error: {args.model} has sha256 {digest}, expected {args.expect_sha256}")
        return 2
    torch.set_num_threads(max(1, args.threads))

    d, f = str(args.model.parent), args.model.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    vocab = tok.get_vocab()
    end_ids = sorted({tok.eos_token_id} | {vocab[n] for n in END_NAMES if n in vocab})
    side = Side(tok, end_ids, args.new_tokens)
    log(f"loaded {args.model.name} in {time.perf_counter() - t0:.1f}s; end-of-turn ids {end_ids}")

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work_ctx = None
        work = args.keep.resolve()
    else:
        work_ctx = tempfile.TemporaryDirectory(prefix="peft_interop_")
        work = Path(work_ctx.name)
    try:
        trained = args.adapter is None
        ours_dir = train_ours(args, work) if trained else args.adapter.resolve()
        peft_model = PeftModel.from_pretrained(base, str(ours_dir)).eval()
        ours_to_peft = run_direction("ours -> PEFT", peft_model, ours_dir, side, args)
        ours_to_peft["trained_here"] = trained
        base = peft_model.unload()

        peft_model, peft_dir = make_peft(base, args, work)
        peft_to_ours = run_direction("PEFT -> ours", peft_model, peft_dir, side, args)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()

    problems = []
    for name, r in [("ours_to_peft", ours_to_peft), ("peft_to_ours", peft_to_ours)]:
        if r["mismatches"]:
            problems.append(f"{name}: {r['mismatches']} mismatching answers")
        if r["max_first_step_logit_delta_vs_base"] < 1e-3:
            problems.append(f"{name}: the adapter does not change the logits")
    if ours_to_peft["changed_vs_base"] == 0:
        problems.append("ours_to_peft: the trained adapter changes no greedy answer")
    if peft_to_ours["changed_vs_base"] < len(PROMPTS):
        problems.append("peft_to_ours: the PEFT adapter leaves some greedy answer unchanged; raise --b-scale")

    for r in (ours_to_peft, peft_to_ours):
        for c in r["cases"]:
            del c["hf_text"], c["ours_text"]  # on stderr already; keep the summary one short line
    summary = {
        "check": "peft_interop",
        "ok": not problems,
        "problems": problems,
        "model_sha256": digest,
        "new_tokens": args.new_tokens,
        "tie_margin": args.tie_margin,
        "ours_to_peft": ours_to_peft,
        "peft_to_ours": peft_to_ours,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
