#!/usr/bin/env python3
"""Reference token ids of a SentencePiece (llama / TinyLlama style) GGUF tokenizer, from llama.cpp.

Writes model/tests/fixtures/tokenizer_spm_hf.json, the same vocabulary as a Hugging Face
tokenizer.json in Llama-2's layout (see hf_tokenizer), and model/tests/fixtures/tokenizer_spm.json,
holding
  * the vocabulary of a small SentencePiece BPE model (pieces, scores, token types) and the
    GGUF tokenizer metadata written for it, so the Rust test can rebuild the very same GGUF;
  * for every case: the text, the ids llama.cpp's `llama-tokenize` gives for it, and the text
    llama.cpp's detokenizer gives back for those ids.

How:
  1. Train a SentencePiece BPE model (PyPI `sentencepiece`) on the English/code corpus below, with
     Llama-2's trainer settings where they matter: byte_fallback, split_digits,
     allow_whitespace_only_pieces, identity normalization, no removal of extra whitespace,
     add_dummy_prefix, <unk>=0 <s>=1 </s>=2. Training is single-threaded and deterministic.
  2. Convert it as llama.cpp's convert_hf_to_gguf.py does (_create_vocab_sentencepiece: piece, score,
     type NORMAL/UNKNOWN/CONTROL/BYTE) and write a vocabulary-only GGUF (general.architecture =
     llama, a few hparams, no tensors) with the gguf-py of the same llama.cpp source tree.
  3. For each case run
       llama-tokenize -m VOCAB.gguf -f TEXT_FILE --ids --no-bos --no-escape --log-disable
     (special tokens in the text are parsed, llama-tokenize's default), and once more without
     `--ids` to get each token's piece (common_token_to_piece, specials rendered). llama.cpp's
     llama_detokenize(ids, remove_special=false, unparse_special=true) is those pieces joined, with
     one leading space removed from the first (add_space_prefix); that text is stored as
     `decoded`. The BOS case is run without `--no-bos` (add_bos_token = true).

Usage (from the repository root):
  tools/reference/build_llamacpp.sh /tmp/llamacpp            # once; builds llama-tokenize
  python3 -m pip install sentencepiece numpy transformers protobuf
  python3 tools/reference/spm_refs.py [--llama-dir /tmp/llamacpp] [--keep-gguf PATH]
"""

import argparse
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(REPO, "model", "tests", "fixtures", "tokenizer_spm.json")
HF_FIXTURE = os.path.join(REPO, "model", "tests", "fixtures", "tokenizer_spm_hf.json")
VOCAB_SIZE = 900

# Training text: one sentence per line (SentencePiece never sees a newline, so "\n" is a byte
# token, as in Llama-2). A little Chinese, so some CJK characters are pieces and others fall back
# to bytes.
CORPUS = """\
The quick brown fox jumps over the lazy dog.
A federated network of small language models learns from data that never leaves the device.
Each node trains its own adapter, then the adapters are averaged in a fixed order.
The model reads the prompt, predicts the next token, and repeats until it sees the end token.
Tokenizers split text into pieces; the pieces are numbers that the model can embed.
Hello world! Hello there, how are you today? I am fine, thank you very much.
It's a nice day, isn't it? We'll see. They'd have said no, but they didn't.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
In the beginning the training loss is high; after a few hundred steps it starts to fall.
Learning rate, batch size, rank and alpha are the settings that matter most for LoRA.
The quick red fox and the lazy brown dog became friends in the end.
Numbers like 12345, 3.14159, 2024 and 1,000,000 are split into single digits.
Call 555-0199 or write to the team at the address on the web page.
def train(model, data, steps=100):
    for step in range(steps):
        loss = model.step(data[step % len(data)])
        print(f"step {step}: loss {loss:.4f}")
    return model
fn main() { let x: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!("{:?}", x); }
if (a == b && c != d) { return a + b * c - d / 2; } else { return 0; }
for i in 0..n { sum += values[i]; } // add every value
import numpy as np; x = np.zeros((3, 4)); y = x.sum(axis=0)
The server sends a request, and the client waits for the response before it goes on.
Peers gossip announcements; a node fetches the adapter bytes and checks their hash.
When the round closes, every honest node computes the same average and the same hash.
Good morning, good evening, good night. See you tomorrow, my friend.
Science, history, music and art are taught in the school near the river.
The weather today is sunny with a light wind from the west and no rain.
Please answer in one word: what is the capital of France? Paris.
Write a short poem about the sea, the sky and the stars at night.
你好，世界。我们学习语言模型。你好吗？我很好，谢谢。
Café, naïve, façade and résumé are words with accents.
The cat sat on the mat. The dog sat on the log. The bird sat in the tree.
Models with more parameters need more memory, more data and more time to train.
A token is a piece of a word; common words are one token, rare words are several.
Spaces matter: "  two spaces" and "one space" give different tokens.
    Indented lines start with four spaces, as code often does.
\tTabs are rare in prose but common in some code.
HTTP GET /api/v1/models returns a JSON list of model names and sizes.
{"name": "adapter", "rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
The end.
"""

CASES = [
    ("english", "Hello world! The quick brown fox jumps over the lazy dog."),
    ("english_contractions", "It's a nice day, isn't it? We'll see; they'd've said 'no'."),
    ("english_rare_words", "Xylophones quizzically juxtapose zephyrs; BLOCKCAPS and MiXeD CaSe."),
    ("leading_spaces", "   three leading spaces"),
    ("leading_space", " one leading space"),
    ("trailing_spaces", "trailing spaces   "),
    ("multiple_spaces", "multiple   spaces  between    words"),
    ("only_spaces", "     "),
    ("single_space", " "),
    ("newlines", "line one\nline two\n\nline four\n"),
    ("only_newline", "\n"),
    ("crlf_tabs", "tabs\tand\tcarriage\r\nreturns \t \r\n"),
    ("chinese_known", "你好，世界。我们学习语言模型。"),
    ("chinese_fallback", "机器学习需要大量的数据，自然语言处理很有趣！"),
    ("japanese_korean", "日本語のテキストです。한국어 텍스트입니다."),
    ("emoji", "I ❤️ Rust 🦀🚀 and family 👩‍👩‍👧‍👦! 😀 👍🏽"),
    ("digits", "12345 and 3.14159, 2024-06-01, 1,000,000 and 007"),
    ("code_python", "def f(a, b):\n    return a ** b  # power\n\nprint(f(2, 10))\n"),
    ("code_rust", "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n"),
    ("json", "{\"name\": \"adapter\", \"rank\": 8, \"alpha\": 16.5, \"ok\": true}"),
    ("accents_scripts", "Café naïve façade résumé; Ελληνικά, русский, العربية"),
    ("special_tokens", "<s>Hello</s> world<unk> and </s>"),
    ("special_adjacent", "<s></s><unk>text<s> <s>x"),
    ("special_lookalike", "<s > < s> <S> <0x41> </s"),
    ("metaspace_char", "a\u2581b \u2581 c"),
    ("repeats", "aaaaaaaaaaaaaaaa ........ ------ !!!???"),
    ("empty", ""),
]

# Cases also run with the BOS token (llama-tokenize without --no-bos).
BOS_CASES = ["english", "special_tokens", "empty"]


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def train(spm):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def vocabulary(sp):
    """Pieces, scores and GGUF token types, as convert_hf_to_gguf.py's _create_vocab_sentencepiece."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        t = 1  # NORMAL
        if sp.IsUnknown(i):
            t = 2
        elif sp.IsControl(i):
            t = 3
        elif sp.IsUnused(i):
            t = 5
        elif sp.IsByte(i):
            t = 6
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(t)
    return tokens, scores, types


# Tokenizer metadata besides tokens/scores/types; the Rust test writes the same keys.
METADATA = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.pre": "default",
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.add_eos_token": False,
}


def write_gguf(gguf, path, tokens, scores, types):
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("spm-test-vocab")
    # hparams, so that llama.cpp accepts the file (vocab_only: no tensors are read)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(METADATA["tokenizer.ggml.model"])
    w.add_tokenizer_pre(METADATA["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(METADATA["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(METADATA["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(METADATA["tokenizer.ggml.unknown_token_id"])
    w.add_add_bos_token(METADATA["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(METADATA["tokenizer.ggml.add_eos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_tokenizer(tokens, scores, types):
    """The Hugging Face tokenizer.json of the same vocabulary, in Llama-2's layout.

    As transformers' LlamaConverter (legacy) builds it: merges from
    transformers.convert_slow_tokenizer.generate_merges(vocab, vocab_scores) (every split of every
    piece, ordered by the piece's score), BPE with byte_fallback and fuse_unk, normalizer
    Prepend("▁") + Replace(" ", "▁"), decoder Replace("▁", " ") / ByteFallback / Fuse / Strip(" ", 1),
    control pieces as special added tokens. (LlamaConverter.converted() itself cannot be called in
    transformers 5.24: it passes the scores where SentencePieceExtractor.extract wants a model type.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores)))
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(prepend="\u2581"),
                                           normalizers.Replace(pattern=" ", content="\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty in (2, 3)])
    return tok


def run_tool(tool, gguf_path, text, ids_only, bos):
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        cmd = [tool, "-m", gguf_path, "-f", path, "--no-escape", "--log-disable"]
        if ids_only:
            cmd.append("--ids")
        if not bos:
            cmd.append("--no-bos")
        return subprocess.run(cmd, check=True, capture_output=True).stdout
    finally:
        os.unlink(path)


def token_ids(tool, gguf_path, text, bos):
    out = run_tool(tool, gguf_path, text, True, bos).decode("utf-8")
    lines = [l for l in out.splitlines() if l.startswith("[")]
    if len(lines) != 1:
        sys.exit(f"unexpected llama-tokenize output for {text!r}: {out!r}")
    return json.loads(lines[0])


def pieces(tool, gguf_path, text, ids, bos):
    """The bytes of each token as llama-tokenize prints them: `%6d -> '<piece>'\\n` per token."""
    out = run_tool(tool, gguf_path, text, False, bos)
    heads = [("%6d -> '" % i).encode() for i in ids]
    pos, result = 0, []
    for k, head in enumerate(heads):
        if not out.startswith(head, pos):
            sys.exit(f"cannot parse pieces for {text!r} at token {k}: {out!r}")
        pos += len(head)
        end = out.find(b"'\n" + heads[k + 1], pos) if k + 1 < len(heads) else out.rfind(b"'\n")
        if end < pos:
            sys.exit(f"cannot parse pieces for {text!r} at token {k}: {out!r}")
        result.append(out[pos:end])
        pos = end + 2
    return result


def detokenize(piece_bytes):
    """llama_detokenize(remove_special=false, unparse_special=true) with add_space_prefix."""
    if piece_bytes and piece_bytes[0].startswith(b" "):
        piece_bytes = [piece_bytes[0][1:]] + piece_bytes[1:]
    return b"".join(piece_bytes).decode("utf-8", errors="replace")


def dump(doc, path):
    """JSON with one line per case and the vocabulary arrays on single lines, for readable diffs."""
    parts = []
    for k, v in doc.items():
        if k == "cases":
            lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in v)
            parts.append(f' "cases": [\n{lines}\n ]')
        else:
            parts.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")
    json.loads(open(path, encoding="utf-8").read())  # still valid JSON


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-dir", default="/tmp/llamacpp",
                    help="BUILD_DIR given to build_llamacpp.sh")
    ap.add_argument("--keep-gguf", help="also keep the generated GGUF at this path")
    args = ap.parse_args()

    tool = os.path.join(args.llama_dir, "build", "bin", "llama-tokenize")
    srcs = glob.glob(os.path.join(args.llama_dir, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if not os.access(tool, os.X_OK) or len(srcs) != 1:
        sys.exit(f"no llama-tokenize build under {args.llama_dir}; run build_llamacpp.sh first")
    version = os.path.basename(os.path.dirname(os.path.dirname(srcs[0])))
    sys.path.insert(0, os.path.join(srcs[0], "gguf-py"))
    import gguf  # noqa: E402  (the gguf-py of the same llama.cpp source)
    import sentencepiece as spm  # noqa: E402

    sp = train(spm)
    tokens, scores, types = vocabulary(sp)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert sum(t == 6 for t in types) == 256

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spm-vocab.gguf")
        write_gguf(gguf, path, tokens, scores, types)
        gguf_bytes = open(path, "rb").read()
        if args.keep_gguf:
            with open(args.keep_gguf, "wb") as f:
                f.write(gguf_bytes)
        # What llama.cpp reads back is what we wrote.
        r = gguf.GGUFReader(path)
        assert r.fields["tokenizer.ggml.tokens"].contents() == tokens
        assert r.fields["tokenizer.ggml.scores"].contents() == scores

        cases = []
        for name, text in CASES:
            ids = token_ids(tool, path, text, bos=False)
            decoded = detokenize(pieces(tool, path, text, ids, bos=False))
            case = {"name": name, "text": text, "ids": ids, "decoded": decoded}
            if name in BOS_CASES:
                with_bos = token_ids(tool, path, text, bos=True)
                assert with_bos == [1] + ids, (name, with_bos, ids)
                case["ids_with_bos"] = with_bos
            cases.append(case)

    hf = hf_tokenizer(tokens, scores, types)
    hf_agree = sum(hf.encode(c["text"], add_special_tokens=False).ids == c["ids"] for c in cases)
    with open(HF_FIXTURE, "w", encoding="utf-8") as f:
        f.write(hf.to_str(pretty=False) + "\n")

    how = ("sentencepiece " + spm.__version__ + " BPE trained on the corpus in "
           "tools/reference/spm_refs.py, converted as convert_hf_to_gguf.py does and written with "
           f"gguf-py; ids from llama-tokenize -m VOCAB.gguf -f TEXT_FILE --ids --no-bos --no-escape "
           f"--log-disable, llama.cpp vendored in {version} (PyPI sdist), built by "
           "tools/reference/build_llamacpp.sh; decoded = llama-tokenize's pieces joined, first "
           "leading space removed; regenerate with tools/reference/spm_refs.py")
    doc = {
        "generated_by": how,
        "gguf_sha256": sha256(gguf_bytes),
        "gguf_bytes": len(gguf_bytes),
        "metadata": METADATA,
        "tokens": tokens,
        "scores": scores,
        "token_types": types,
        "cases": cases,
    }
    dump(doc, FIXTURE)
    n_rt = sum(c["decoded"] == c["text"] for c in cases)
    print(f"wrote {len(tokens)} pieces and {len(cases)} cases ({n_rt} round-trip in llama.cpp) "
          f"to {FIXTURE}; Hugging Face tokenizers agrees with llama.cpp on {hf_agree} cases; "
          f"wrote {HF_FIXTURE}")


if __name__ == "__main__":
    main()
