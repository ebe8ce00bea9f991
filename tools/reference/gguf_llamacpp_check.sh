#!/usr/bin/env bash
# The GGUF export against llama.cpp itself: an adapter trained by `hive-node train` on the
# default model, exported with `hive-node export --gguf` (a llama.cpp LoRA) and `--merged` (one
# GGUF), must make llama.cpp's greedy answer equal `hive-node chat --temperature 0
# --repeat-penalty 1` with the same adapter; the base model alone is compared too.
#
# Equality is required on the default model dequantized to F32 (llama-quantize
# --allow-requantize ... F32): there both programs multiply the same f32 weights. On the Q4_1
# file itself llama.cpp quantizes the activations to 8 bits before each matmul and hive-node
# does not (it computes what Hugging Face's dequantize-then-multiply computes), so greedy
# answers part after some tokens even without an adapter; those cases print how many
# characters agree, for information.
#
# Usage: tools/reference/gguf_llamacpp_check.sh LLAMA_BIN_DIR [WORK_DIR]
#   LLAMA_BIN_DIR   holds llama-completion and llama-quantize (tools/reference/build_llamacpp.sh
#                   BUILD_DIR with TARGETS="llama-completion llama-quantize" builds them into
#                   BUILD_DIR/build/bin)
#   WORK_DIR        scratch dir (default: a new temp dir); keep it to look at the files
# Needs a built hive-node (cargo build) and the default model (hive-node model pull). Trains
# for about 3 minutes on 2 cores. Prints one JSON line per prompt and case, then PASS or FAIL.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 LLAMA_BIN_DIR [WORK_DIR]" >&2
    exit 2
fi
llama="$1/llama-completion"
quantize="$1/llama-quantize"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
hive="$repo/target/debug/hive-node"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
[[ -x "$llama" ]] || { echo "no $llama" >&2; exit 2; }
[[ -x "$quantize" ]] || { echo "no $quantize" >&2; exit 2; }
[[ -x "$hive" ]] || { echo "no $hive (cargo build first)" >&2; exit 2; }
model="$("$hive" model path)"
n=32

cd "$work"
if [[ ! -f adapter/adapter_model.safetensors ]]; then
    "$hive" train --create-sample >/dev/null
    "$hive" train --data data/sample_dataset.json --output adapter --epochs 10 --grad-accum 1 \
        --lr 1e-3 --data-dir "$work/node" >/dev/null
fi
[[ -f base-f32.gguf ]] || "$quantize" --allow-requantize "$model" base-f32.gguf F32 >/dev/null 2>&1
"$hive" export --adapter adapter --gguf --output lora.gguf --data-dir "$work/node"
"$hive" export --adapter adapter --merged --output merged.gguf --data-dir "$work/node"
"$hive" export --adapter adapter --merged --model base-f32.gguf --output merged-f32.gguf \
    --data-dir "$work/node"

# SmolLM2's chat template with its default system prompt (what `hive-node chat` renders).
render() {
    printf '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n' "$1"
}

llama_answer() { # model-args... -- prompt
    local args=()
    while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
    # llama.cpp drops one trailing newline of a prompt file; the prompt ends in one.
    { render "$2"; printf '\n'; } > prompt.txt
    "$llama" "${args[@]}" -f prompt.txt -n "$n" --temp 0 --repeat-penalty 1.0 -t 2 \
        --no-display-prompt --no-warmup -no-cnv 2>/dev/null || echo "(llama.cpp failed: $?)"
}

hive_answer() { # model-args... -- prompt
    local args=()
    while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
    "$hive" chat "${args[@]}" --prompt "$2" --temperature 0 --repeat-penalty 1 \
        --max-new-tokens "$n" --data-dir "$work/node" 2>/dev/null || echo "(hive-node failed: $?)"
}

# One JSON line: equal after trimming whitespace (and a character cut in half at the token
# limit), else how many characters agree. Exit status 1 when not equal.
compare() { # exact|info prompt case hive llama
    python3 - "$@" <<'PY'
import json, sys
mode, prompt, case, h, l = sys.argv[1:6]
# llama.cpp ends an answer that stopped at end-of-turn with " [end of text]".
l = l.strip().removesuffix("[end of text]")
h, l = h.strip(), l.strip().rstrip("\ufffd")
same = h == l
n = 0
while n < min(len(h), len(l)) and h[n] == l[n]:
    n += 1
print(json.dumps({"model": "f32" if mode == "exact" else "q4_1", "prompt": prompt, "case": case,
                  "equal": same, "agree_chars": n, "hive_node": h, "llama_cpp": l},
                 ensure_ascii=False))
sys.exit(0 if same or mode == "info" else 1)
PY
}

fail=0
for prompt in "你是谁？" "What is HiveMind?" "Name three colours."; do
    base_h="$(hive_answer --model base-f32.gguf --use none -- "$prompt")"
    lora_h="$(hive_answer --model base-f32.gguf --adapter adapter -- "$prompt")"
    [[ "$base_h" != "$lora_h" ]] || { echo "the adapter changes nothing for $prompt" >&2; fail=1; }
    compare exact "$prompt" base "$base_h" "$(llama_answer -m base-f32.gguf -- "$prompt")" || fail=1
    compare exact "$prompt" lora "$lora_h" \
        "$(llama_answer -m base-f32.gguf --lora lora.gguf -- "$prompt")" || fail=1
    compare exact "$prompt" merged "$lora_h" "$(llama_answer -m merged-f32.gguf -- "$prompt")" || fail=1
    # The Q4_1 file as people run it (for information: see the header).
    q_lora_h="$(hive_answer --adapter adapter -- "$prompt")"
    compare info "$prompt" base "$(hive_answer --use none -- "$prompt")" \
        "$(llama_answer -m "$model" -- "$prompt")"
    compare info "$prompt" lora "$q_lora_h" "$(llama_answer -m "$model" --lora lora.gguf -- "$prompt")"
    compare info "$prompt" merged "$q_lora_h" "$(llama_answer -m merged.gguf -- "$prompt")"
done
if [[ $fail == 0 ]]; then echo PASS; else echo FAIL; exit 1; fi
