#!/usr/bin/env bash
# The GGUF export against llama.cpp itself: an adapter trained by `hive-node train` on the
# default model, exported with `hive-node export --gguf` (a llama.cpp LoRA) and `--merged` (one
# GGUF), must make llama.cpp's greedy answer equal `hive-node chat --temperature 0
# --repeat-penalty 1` with the same adapter; the base model alone is compared too (so a
# difference can be told apart from one the adapter makes).
#
# Usage: tools/reference/gguf_llamacpp_check.sh LLAMA_BIN_DIR [WORK_DIR]
#   LLAMA_BIN_DIR   holds llama-completion (tools/reference/build_llamacpp.sh BUILD_DIR builds it
#                   into BUILD_DIR/build/bin; TARGETS=llama-completion is enough)
#   WORK_DIR        scratch dir (default: a new temp dir); keep it to look at the files
# Needs a built hive-node (cargo build) and the default model (hive-node model pull). Trains
# for about 3 minutes on 2 cores. Prints one JSON line per prompt and case, then PASS or FAIL.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 LLAMA_BIN_DIR [WORK_DIR]" >&2
    exit 2
fi
llama="$1/llama-completion"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
hive="$repo/target/debug/hive-node"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
[[ -x "$llama" ]] || { echo "no $llama" >&2; exit 2; }
[[ -x "$hive" ]] || { echo "no $hive (cargo build first)" >&2; exit 2; }
model="$("$hive" model path)"
n=32

cd "$work"
if [[ ! -f adapter/adapter_model.safetensors ]]; then
    "$hive" train --create-sample >/dev/null
    "$hive" train --data data/sample_dataset.json --output adapter --epochs 10 --grad-accum 1 \
        --lr 1e-3 --data-dir "$work/node" >/dev/null
fi
"$hive" export --adapter adapter --gguf --output lora.gguf --data-dir "$work/node"
"$hive" export --adapter adapter --merged --output merged.gguf --data-dir "$work/node"

# SmolLM2's chat template with its default system prompt (what `hive-node chat` renders).
render() {
    printf '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n' "$1"
}

llama_answer() { # model-args... -- prompt
    local args=() p
    while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
    p="$2"
    render "$p" > prompt.txt
    "$llama" "${args[@]}" -f prompt.txt -n "$n" --temp 0 --repeat-penalty 1.0 -t 2 \
        --no-display-prompt --no-warmup -no-cnv 2>/dev/null | sed 's/ *\[end of text\]$//'
}

hive_answer() { # adapter-args... -- prompt
    local args=()
    while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
    "$hive" chat "${args[@]}" --prompt "$2" --temperature 0 --repeat-penalty 1 \
        --max-new-tokens "$n" --data-dir "$work/node" 2>/dev/null
}

fail=0
for prompt in "你是谁？" "What is HiveMind?" "Name three colours."; do
    base_h="$(hive_answer --use none -- "$prompt")"
    base_l="$(llama_answer -m "$model" -- "$prompt")"
    lora_h="$(hive_answer --adapter adapter -- "$prompt")"
    lora_l="$(llama_answer -m "$model" --lora lora.gguf -- "$prompt")"
    merged_l="$(llama_answer -m merged.gguf -- "$prompt")"
    for case in base lora merged; do
        case $case in
            base) h="$base_h"; l="$base_l" ;;
            lora) h="$lora_h"; l="$lora_l" ;;
            merged) h="$lora_h"; l="$merged_l" ;;
        esac
        # llama.cpp prints what it generated; hive-node trims the answer's ends.
        h_t="$(printf '%s' "$h" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
        l_t="$(printf '%s' "$l" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
        same=false
        [[ "$h_t" == "$l_t" ]] && same=true
        [[ $same == true ]] || fail=1
        python3 -c 'import json,sys; print(json.dumps({"prompt": sys.argv[1], "case": sys.argv[2], "equal": sys.argv[3] == "true", "hive_node": sys.argv[4], "llama_cpp": sys.argv[5]}, ensure_ascii=False))' \
            "$prompt" "$case" "$same" "$h_t" "$l_t"
    done
    [[ "$base_h" != "$lora_h" ]] || { echo "the adapter changes nothing for $prompt" >&2; }
done
if [[ $fail == 0 ]]; then echo PASS; else echo FAIL; exit 1; fi
