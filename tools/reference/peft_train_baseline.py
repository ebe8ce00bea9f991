#!/usr/bin/env python3
"""The PEFT baseline of HiveMind's training benchmark (model/examples/bench_train.rs).

The job, identical on both sides: the default model (SmolLM2-135M-Instruct, the Q4_1 GGUF that
HiveMind loads; transformers dequantizes it to float32), LoRA r=16, alpha=32, dropout 0.05 on
q/k/v/o/gate/up/down, AdamW lr 2e-4, one fixed batch of 4 sequences x 128 tokens with every next
token a label, 5 optimizer steps (forward, backward, step, zero_grad), train mode, CPU only.
Token ids follow the formula shared with the Rust benchmark: id(b, t) = ((b*seq + t) * 7919 + 13)
% vocab.

Prints one JSON object on stdout: tokens/s over all steps (batch*seq*steps / their wall time), the
per-step seconds, and the peak resident memory of this process (ru_maxrss).

Run (CPU only; the venv of tools/reference/requirements-hf.txt, which pins peft too):

    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tools/reference/peft_train_baseline.py \\
        --model ~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    ids = [[((b * seq + t) * 7919 + 13) % vocab for t in range(seq)] for b in range(batch)]
    return torch.tensor(ids, dtype=torch.long)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="GGUF file")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.model.expanduser().resolve()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.05,
        target_modules=MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    ids = batch_ids(args.batch, args.seq, model.config.vocab_size)

    steps = []
    losses = []
    for _ in range(args.steps):
        s = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - s)
        losses.append(float(out.loss))
    total = sum(steps)
    tokens = args.batch * args.seq * args.steps
    print(
        json.dumps(
            {
                "impl": "peft",
                "tokens_per_s": tokens / total,
                "step_seconds": steps,
                "losses": losses,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "load_seconds": load_s,
                "trainable_parameters": sum(p.numel() for p in params),
                "threads": torch.get_num_threads(),
                "gradient_checkpointing": args.gradient_checkpointing,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
                "cpu_count": os.cpu_count(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
