#!/usr/bin/env bash
# The GGUF export against llama.cpp itself: an adapter trained by `hive-node train` on the
# default model, exported with `hive-node export --gguf` (a llama.cpp LoRA) and `--merged` (one
# GGUF), must make llama.cpp's greedy answer equal `hive-node chat --temperature 0
# --repeat-penalty 1` with the same adapter; the base model alone is compared too.
#
# Equality is required on the default model dequantized to F32 (llama-quantize
# --allow-requantize ... F32): there both programs multiply the same f32 weights.
#
# On the Q4_1 file itself greedy text cannot be the test: llama.cpp quantizes the activations to
# 8 bits before each matmul, and that rounding amplifies any difference in the arithmetic around
# it, llama.cpp's own included (its flash-attention path, the default, and its plain path part on
# 3 of 4 answers tried). So on Q4_1 the check compares logits step by step with teacher forcing
# (tools/reference/llama_logits.cpp against `examples/greedy_logits`): llama.cpp's default greedy
# tokens are fed to llama.cpp without flash attention and to HiveMind, and HiveMind must pick
# llama.cpp's token at least as often as llama.cpp's other path does. The greedy text comparison
# on Q4_1 is printed for information.
#
# Usage: tools/reference/gguf_llamacpp_check.sh LLAMA_BIN_DIR [WORK_DIR]
#   LLAMA_BIN_DIR   holds llama-completion, llama-quantize and llama-logits
#                   (tools/reference/build_llamacpp.sh BUILD_DIR with
#                   TARGETS="llama-completion llama-quantize" builds them into BUILD_DIR/build/bin)
#   WORK_DIR        scratch dir (default: a new temp dir); keep it to look at the files
# Needs a built hive-node and greedy_logits (cargo build --bin hive-node && cargo build -p
# hivemind-model --example greedy_logits) and the default model (hive-node model pull). Trains
# for about 3 minutes on 2 cores. Prints one JSON line per prompt and case, then PASS or FAIL.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 LLAMA_BIN_DIR [WORK_DIR]" >&2
    exit 2
fi
llama="$1/llama-completion"
quantize="$1/llama-quantize"
llama_logits="$1/llama-logits"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
hive="$repo/target/debug/hive-node"
greedy_logits="$repo/target/debug/examples/greedy_logits"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
[[ -x "$llama" ]] || { echo "no $llama" >&2; exit 2; }
[[ -x "$quantize" ]] || { echo "no $quantize" >&2; exit 2; }
[[ -x "$llama_logits" ]] || { echo "no $llama_logits" >&2; exit 2; }
[[ -x "$hive" ]] || { echo "no $hive (cargo build first)" >&2; exit 2; }
[[ -x "$greedy_logits" ]] || { echo "no $greedy_logits (cargo build -p hivemind-model --example greedy_logits)" >&2; exit 2; }
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

# Teacher-forced logits on the Q4_1 file: one JSON line with how often llama.cpp without flash
# attention and HiveMind pick llama.cpp's default greedy token, and their largest logit gaps.
forced() { # prompt case llama-model [lora.gguf] -- [adapter-dir]
    local prompt="$1" case="$2" lmodel="$3" lora="" adapter=""
    shift 3
    [[ "$1" != "--" ]] && { lora="$1"; shift; }
    shift
    [[ $# -gt 0 ]] && adapter="$1"
    render "$prompt" > forced.txt
    # A failing run says so (its stderr is in forced.log) and fails the check.
    env -u FORCE FA=1 "$llama_logits" "$lmodel" forced.txt "$n" $lora > ref.jsonl 2>forced.log \
        || { echo "llama-logits failed ($case, $prompt): see $work/forced.log" >&2; return 1; }
    local ids force
    ids="$(python3 -c 'import json,sys; print(",".join(map(str, json.loads(open(sys.argv[1]).readline())["prompt"])))' ref.jsonl)"
    force="$(python3 -c 'import json,sys; print(",".join(str(json.loads(l)["top"][0][0]) for l in open(sys.argv[1]) if "step" in l))' ref.jsonl)"
    FA=0 FORCE="$force" "$llama_logits" "$lmodel" forced.txt "$n" $lora > off.jsonl 2>forced.log \
        || { echo "llama-logits -fa off failed ($case, $prompt): see $work/forced.log" >&2; return 1; }
    FORCE="$force" "$greedy_logits" "$model" "$ids" "$n" $adapter > ours.jsonl 2>forced.log \
        || { echo "greedy_logits failed ($case, $prompt): see $work/forced.log" >&2; return 1; }
    python3 - "$prompt" "$case" "$n" <<'PY'
import json, sys
def steps(path):
    return [dict((i, v) for i, v in json.loads(l)["top"]) for l in open(path) if '"step"' in l]
ref, off, ours = steps("ref.jsonl"), steps("off.jsonl"), steps("ours.jsonl")
if not len(ref) == len(off) == len(ours) == int(sys.argv[3]):
    sys.exit(f"steps: llama.cpp {len(ref)}, -fa off {len(off)}, hive-node {len(ours)}, wanted {sys.argv[3]}")
def agree(other):
    same, gap = 0, 0.0
    for a, b in zip(ref, other):
        same += max(a, key=a.get) == max(b, key=b.get)
        common = [i for i in a if i in b]
        gap = max([gap] + [abs(a[i] - b[i]) for i in common])
    return same, round(gap, 4)
(o, og), (h, hg) = agree(off), agree(ours)
print(json.dumps({"model": "q4_1", "prompt": sys.argv[1], "case": sys.argv[2], "forced_steps": len(ref),
                  "llama_cpp_no_flash_attention_agrees": o, "hive_node_agrees": h,
                  "llama_cpp_no_flash_attention_max_logit_gap": og, "hive_node_max_logit_gap": hg},
                 ensure_ascii=False))
PY
}

fail=0
forced_log="$work/forced.jsonl"
: > "$forced_log"
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
    forced "$prompt" base "$model" -- | tee -a "$forced_log" || fail=1
    forced "$prompt" lora "$model" lora.gguf -- adapter | tee -a "$forced_log" || fail=1
    forced "$prompt" merged merged.gguf -- adapter | tee -a "$forced_log" || fail=1
done
# HiveMind must agree with llama.cpp at least as often as llama.cpp's other attention path does.
python3 - "$forced_log" <<'PY' || fail=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = sum(r["hive_node_agrees"] for r in rows)
theirs = sum(r["llama_cpp_no_flash_attention_agrees"] for r in rows)
steps = sum(r["forced_steps"] for r in rows)
print(json.dumps({"q4_1_forced_steps": steps, "hive_node_agrees": ours,
                  "llama_cpp_no_flash_attention_agrees": theirs}))
sys.exit(0 if steps > 0 and ours >= theirs else 1)
PY
if [[ $fail == 0 ]]; then echo PASS; else echo FAIL; exit 1; fi
