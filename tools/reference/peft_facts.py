#!/usr/bin/env python3
"""PEFT's side of the learning benchmark (examples/learning_bench.rs, issue 12): the same users
trained on the same tokens by PyTorch + PEFT, saved as adapters that the benchmark then merges and
scores with HiveMind's own aggregation and eval.

    cargo run --example learning_bench -- --dump-examples /tmp/facts
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tools/reference/peft_facts.py \\
        --model ~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf --dir /tmp/facts
    cargo run --example learning_bench -- --users-from /tmp/facts --rules exact,iso:1.5 --round-only

Two more modes: `--score exact,iso:1.5` merges the users' trained
updates densely in torch and scores the greedy answers with transformers (an independent computation
of the rules and of `hive-node eval`'s exact match), and `--rounds 3` runs torch-only round chains
(`--round-steps` per user per round, each round's merge `--round-rule` added to the base weights).

`examples.json` (written by `--dump-examples`) holds every fact as token ids and a target mask,
rendered by HiveMind's chat template, so both trainers see the same tokens and learn the same
(assistant) tokens. Each user trains full batch on its shard, and `central` on every fact: LoRA on
all seven modules, dropout 0, AdamW at a constant learning rate, loss = mean cross-entropy over the
target tokens of the batch. Adapters go to `DIR/user{k}` and `DIR/central` in PEFT's format; one
JSON line on stdout gives every run's loss curve. `--out DIR2` puts the adapters elsewhere, and
`--seed-per-user` starts user k from the A of seed + k instead of everyone's same A.

Not part of CI: torch is a multi-GB install (tools/reference/requirements-hf.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 where a token is not learned)."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["ids"])
        ids[i, :n] = torch.tensor(e["ids"])
        mask[i, :n] = 1
        for t, learned in enumerate(e["targets"]):
            if learned and t > 0:
                labels[i, t] = e["ids"][t]
    return ids, mask, labels


def load_base(path: Path, deltas: dict | None = None):
    """A fresh base model (get_peft_model changes the model it is given), with earlier rounds'
    merged updates added to its weights."""
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    weights = dict(base.named_parameters())
    with torch.no_grad():
        for name, delta in (deltas or {}).items():
            weights[name] += delta
    return base


def train(
    path: Path, examples: list[dict], args, out: Path, seed: int, steps: int, deltas=None
) -> list[float]:
    base = load_base(path, deltas)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ids, mask, labels = batch(examples)
    losses = []
    for _ in range(steps):
        # Hugging Face shifts the labels inside the model: label t is predicted from the tokens
        # before it, as HiveMind's target t is.
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.save_pretrained(out)
    return losses


def greedy_scores(model, examples: list[dict], new_tokens: int, eos: set[int]) -> list[bool]:
    """Exact match of each example's greedy answer: the prompt is every token before the first
    target, the reference the target tokens up to the end of turn."""
    out = []
    for e in examples:
        first = e["targets"].index(True)
        ids = list(e["ids"][:first])
        want = [t for t in e["ids"][first:] if t not in eos]
        # The final newline after the end-of-turn id is not part of the answer.
        want = want[: len(want) - 1] if e["ids"][-1] not in eos else want
        got = []
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                t = int(torch.argmax(logits))
                if t in eos:
                    break
                got.append(t)
                ids.append(t)
        out.append(got == want)
    return out


def merged(adapters: list[Path], rule: str, scale: float) -> dict:
    """The users' LoRA updates merged densely by `rule`, by weight name: `exact` (the mean of
    the updates (alpha/r)*B*A, times `scale`) or `iso` (their sum's spectrum flattened to its mean
    singular value, times `scale`), an independent computation of HiveMind's `exact` and `iso:S` rules without
    their input bounds; `sum` and `disjoint` (below) are experiments."""
    from safetensors.torch import load_file

    loaded = []
    for d in adapters:
        cfg = json.loads((d / "adapter_config.json").read_text())
        loaded.append((cfg["lora_alpha"] / cfg["r"], load_file(str(d / "adapter_model.safetensors"))))
    out = {}
    names = sorted(k[: -len(".lora_A.weight")] for k in loaded[0][1] if k.endswith(".lora_A.weight"))
    with torch.no_grad():
        for name in names:
            deltas = [s * t[name + ".lora_B.weight"] @ t[name + ".lora_A.weight"] for s, t in loaded]
            if rule == "exact":
                delta = scale * sum(deltas) / len(deltas)
            elif rule == "sum":
                delta = scale * sum(deltas)
            elif rule == "disjoint":
                # Each singular direction of the sum, divided by how many users share it (the
                # participation ratio of their contributions): one user's direction is kept whole,
                # a direction every user shares is averaged.
                u, sv, vh = torch.linalg.svd(sum(deltas).double(), full_matrices=False)
                c = torch.stack([((u.T @ d.double()) * vh).sum(dim=1) for d in deltas])
                n = c.abs().sum(dim=0) ** 2 / (c * c).sum(dim=0).clamp_min(1e-300)
                delta = (scale * (u * (sv / n)) @ vh).float()
            else:
                u, sv, vh = torch.linalg.svd(sum(deltas).double(), full_matrices=False)
                keep = sv > sv[0] * 1e-6
                u, sv, vh = u[:, keep], sv[keep], vh[keep]
                delta = (scale * sv.mean() * u @ vh).float()
            out[name.removeprefix("base_model.model.") + ".weight"] = delta
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the GGUF file the benchmark used")
    ap.add_argument("--dir", type=Path, required=True, help="holds examples.json; adapters go here")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-central", action="store_true")
    ap.add_argument(
        "--seed-per-user",
        action="store_true",
        help="user k starts from the A of seed + k (default: every user from the same A)",
    )
    ap.add_argument("--out", type=Path, help="where the adapters go (default: DIR)")
    ap.add_argument(
        "--score",
        default="",
        help="instead of training, score merges of DIR/user*: comma-separated exact, iso:S",
    )
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="instead: this many rounds of --round-steps per user, each merged by --round-rule "
        "into the base for the next, scored after each",
    )
    ap.add_argument("--round-steps", type=int, default=10)
    ap.add_argument("--round-rule", default="exact")
    args = ap.parse_args()

    spec = json.loads((args.dir / "examples.json").read_text())
    users, per = spec["users"], spec["facts_per_user"]
    examples = spec["examples"]
    path = args.model.expanduser().resolve()
    out = args.out or args.dir
    eos = {int(t) for t in spec.get("eos", [0, 2])}
    if args.score:
        dirs = [out / f"user{u}" for u in range(users)]
        scores = {}
        for r in args.score.split(","):
            rule, _, scale = r.partition(":")
            model = load_base(path, merged(dirs, rule, float(scale or 1.0)))
            hits = greedy_scores(model, examples, args.new_tokens, eos)
            scores[r] = sum(hits) / len(hits)
            print(f"{r}: exact match {scores[r]:.3f}", file=sys.stderr)
        print(json.dumps({"impl": "torch", "exact_match": scores}))
        return 0
    if args.rounds:
        rule, _, scale = args.round_rule.partition(":")
        deltas: dict = {}
        scores = []
        for r in range(args.rounds):
            dirs = []
            for u in range(users):
                shard = examples[u * per : (u + 1) * per]
                d = out / f"round{r}" / f"user{u}"
                losses = train(path, shard, args, d, args.seed, args.round_steps, deltas)
                print(f"round {r} user {u}: loss {losses[0]:.3f} -> {losses[-1]:.4f}", file=sys.stderr)
                dirs.append(d)
            for name, delta in merged(dirs, rule, float(scale or 1.0)).items():
                deltas[name] = deltas.get(name, 0) + delta
            hits = greedy_scores(load_base(path, deltas), examples, args.new_tokens, eos)
            scores.append(sum(hits) / len(hits))
            print(f"after round {r}: exact match {scores[-1]:.3f}", file=sys.stderr)
        print(json.dumps({"impl": "torch", "rule": args.round_rule, "exact_match": scores}))
        return 0
    runs = {}
    for u in range(users):
        seed = args.seed + u if args.seed_per_user else args.seed
        shard = examples[u * per : (u + 1) * per]
        runs[f"user{u}"] = train(path, shard, args, out / f"user{u}", seed, args.steps)
        print(f"user {u}: loss {runs[f'user{u}'][0]:.3f} -> {runs[f'user{u}'][-1]:.4f}", file=sys.stderr)
    if not args.skip_central:
        runs["central"] = train(path, examples, args, out / "central", args.seed, args.steps)
        print(f"central: loss {runs['central'][0]:.3f} -> {runs['central'][-1]:.4f}", file=sys.stderr)
    print(json.dumps({"impl": "peft", "losses": runs, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
