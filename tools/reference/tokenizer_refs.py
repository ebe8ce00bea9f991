#!/usr/bin/env python3
"""Reference token ids from llama.cpp's tokenizer, for model/tests/tokenizer.rs.

Writes
  model/tests/fixtures/tokenizer_smollm.json        ids of SmolLM2-135M-Instruct (pre = smollm)
  model/tests/fixtures/tokenizer_pre_variants.json  ids of the same vocabulary with
                                                    tokenizer.ggml.pre set to qwen2 / llama-bpe / gpt-2

Each id list comes from running llama.cpp's own tool on a file holding the exact UTF-8 text:
  llama-tokenize -m MODEL.gguf -f TEXT_FILE --ids --no-bos --no-escape --log-disable
(special tokens such as <|im_start|> are parsed, llama-tokenize's default). For the variants, the
script first writes vocabulary-only GGUF copies (all metadata of the default model, `pre` changed,
no tensors) with the gguf-py package vendored in the same llama.cpp source tree.

Usage (from the repository root):
  tools/reference/build_llamacpp.sh /tmp/llamacpp            # once; builds llama-tokenize
  python3 tools/reference/tokenizer_refs.py [--llama-dir /tmp/llamacpp] [--gguf PATH]
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "model", "tests", "fixtures")
DEFAULT_GGUF = os.path.expanduser("~/.cache/hivemind/models/SmolLM2-135M-Instruct.Q4_1.gguf")

CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2? Answer in one word.<|im_end|>\n"
    "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\n你好！Can you write a haiku? 🌸<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# (name, text). Names are stable: the Rust test reports failures by name.
CASES = [
    ("english", "Hello world! The quick brown fox jumps over the lazy dog. "
                "It's, isn't it? We'll see; they'd've said 'no'."),
    ("english_caps", "DON'T SHOUT: YOU'LL, I'M, THEY'RE, WE'VE, SHE'D. Mixed CaSe WoRdS."),
    ("chinese", "你好，世界！我们今天学习自然语言处理。机器学习模型需要大量的数据。"),
    ("japanese_korean", "日本語のテキストです。한국어 텍스트입니다."),
    ("code_rust", "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n"
                  "    println!(\"{:?}\", x);\n}\n"),
    ("code_python", "def f(a, b):\n\treturn a ** b  # power\n\nif __name__ == \"__main__\":\n"
                    "    print(f(2, 10))\n"),
    ("digits", "12345 and 3.14159"),
    ("digits_more", "Call 555-0199 or +1 (800) 123-4567; pi=3.14159265358979; 1,000,000 $ 2024"),
    ("digits_unicode", "x² + ½ = ٣ and ⅷ, ①②③, 1０"),
    ("emoji", "I ❤️ Rust 🦀🚀 and family 👩‍👩‍👧‍👦! 😀😃😄 👍🏽"),
    ("whitespace", "  leading spaces\n\n\ttabs\tand   multiple   spaces  \r\n trailing   \n\n\n"),
    ("only_spaces", "     "),
    ("newlines", "\n"),
    ("mixed_scripts", "Ünïcödé façade – naïve café; Ελληνικά, русский язык, العربية, עברית, हिन्दी"),
    ("url_json", "https://example.com/path?query=1&x=y#frag {\"key\": [1, 2.5, null, true]}"),
    ("repeats", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ................ ----------- !!!???"),
    ("chatml", CHATML),
    ("special_adjacent", "<|im_start|><|im_end|>text<|endoftext|> <|im_end|>\n<|im_start|>x"),
    ("special_lookalike", "<|im_start |> <im_start> <|im_start|"),
]

VARIANT_PRES = ["qwen2", "llama-bpe", "gpt-2"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize(tool, gguf, text):
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        out = subprocess.run(
            [tool, "-m", gguf, "-f", path, "--ids", "--no-bos", "--no-escape", "--log-disable"],
            check=True, capture_output=True,
        ).stdout.decode("utf-8")
    finally:
        os.unlink(path)
    lines = [l for l in out.splitlines() if l.startswith("[")]
    if len(lines) != 1:
        sys.exit(f"unexpected llama-tokenize output for {text!r}: {out!r}")
    return json.loads(lines[0])


def dump(doc, path):
    """JSON with one line per case (ids on the same line), so diffs stay readable."""
    def case_lines(cases, indent):
        return (",\n").join(indent + json.dumps(c, ensure_ascii=False) for c in cases)

    head = {k: v for k, v in doc.items() if k not in ("cases", "variants")}
    parts = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in head.items()]
    if "cases" in doc:
        parts.append(' "cases": [\n' + case_lines(doc["cases"], "  ") + "\n ]")
    if "variants" in doc:
        inner = [f'  {json.dumps(pre)}: [\n' + case_lines(cs, "   ") + "\n  ]"
                 for pre, cs in doc["variants"].items()]
        parts.append(' "variants": {\n' + ",\n".join(inner) + "\n }")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")
    json.loads(open(path, encoding="utf-8").read())  # still valid JSON


def write_variant(gguf_mod, src, dst, pre):
    """A vocabulary-only copy of `src` (all metadata, no tensors) with tokenizer.ggml.pre = pre."""
    r = gguf_mod.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf_mod.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf_mod.GGUFValueType.ARRAY else None
        value = pre if name == "tokenizer.ggml.pre" else field.contents()
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-dir", default="/tmp/llamacpp",
                    help="BUILD_DIR given to build_llamacpp.sh")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    args = ap.parse_args()

    tool = os.path.join(args.llama_dir, "build", "bin", "llama-tokenize")
    srcs = glob.glob(os.path.join(args.llama_dir, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if not os.access(tool, os.X_OK) or len(srcs) != 1:
        sys.exit(f"no llama-tokenize build under {args.llama_dir}; run build_llamacpp.sh first")
    version = os.path.basename(os.path.dirname(os.path.dirname(srcs[0])))
    sys.path.insert(0, os.path.join(srcs[0], "gguf-py"))
    import gguf  # noqa: E402  (the gguf-py of the same llama.cpp source)

    how = ("llama-tokenize -m MODEL -f TEXT_FILE --ids --no-bos --no-escape --log-disable, "
           f"llama.cpp vendored in {version} (PyPI sdist), built by "
           "tools/reference/build_llamacpp.sh; regenerate with tools/reference/tokenizer_refs.py")
    os.makedirs(FIXTURES, exist_ok=True)

    cases = [{"name": n, "text": t, "ids": tokenize(tool, args.gguf, t)} for n, t in CASES]
    doc = {"generated_by": how, "gguf": os.path.basename(args.gguf),
           "gguf_sha256": sha256(args.gguf), "cases": cases}
    dump(doc, os.path.join(FIXTURES, "tokenizer_smollm.json"))

    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in VARIANT_PRES:
            path = os.path.join(tmp, f"vocab-{pre}.gguf")
            write_variant(gguf, args.gguf, path, pre)
            variants[pre] = [{"name": n, "text": t, "ids": tokenize(tool, path, t)}
                             for n, t in CASES]
    doc = {"generated_by": how + "; on vocabulary-only copies of the GGUF with "
                                 "tokenizer.ggml.pre replaced",
           "gguf": os.path.basename(args.gguf), "gguf_sha256": sha256(args.gguf),
           "variants": variants}
    dump(doc, os.path.join(FIXTURES, "tokenizer_pre_variants.json"))
    print(f"wrote {len(cases)} cases and {len(variants)} variants to {FIXTURES}")


if __name__ == "__main__":
    main()
