#!/usr/bin/env python3
"""Writes the build context of benches/shapes/context: 20,000 files, 300 MiB in all.

Deterministic (a seeded PRNG, no clock): the same files and bytes on every machine.
Sizes are mixed: 20 large files of 2-6 MiB, the rest log-uniform between 64 B and 256 KiB,
scaled so that the total is exactly 300 MiB. Half the files are random bytes (incompressible),
half are text made of words (compressible, like source code). 200 directories of 100 files,
two levels deep.

usage: gen-context.py DIR      (DIR must not exist or be empty)
"""

import math
import os
import random
import sys

FILES = 20_000
TOTAL = 300 * 1024 * 1024
LARGE = 20
SEED = 20_000_300


def sizes(rng):
    large = [rng.randint(2 << 20, 6 << 20) for _ in range(LARGE)]
    lo, hi = math.log(64), math.log(256 << 10)
    small = [math.exp(rng.uniform(lo, hi)) for _ in range(FILES - LARGE)]
    scale = (TOTAL - sum(large)) / sum(small)
    small = [max(1, int(s * scale)) for s in small]
    small[-1] += TOTAL - sum(large) - sum(small)
    assert small[-1] > 0
    out = large + small
    rng.shuffle(out)
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        sys.exit(f"{root} is not empty")
    rng = random.Random(SEED)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
        for _ in range(2000)
    ]
    lines = []
    text_len = 0
    while text_len < (8 << 20):
        line = " " * (4 * rng.randint(0, 3)) + " ".join(rng.choices(words, k=rng.randint(1, 12))) + "\n"
        lines.append(line)
        text_len += len(line)
    text = "".join(lines).encode()
    for i, size in enumerate(sizes(rng)):
        d = os.path.join(root, f"d{i // 1000:02d}", f"e{(i // 100) % 10}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        if i % 2 == 0:
            data = rng.randbytes(size)
        else:
            # A slice of the text, wrapping around (every size is below the text's 8 MiB).
            start = rng.randrange(len(text))
            data = text[start : start + size]
            data += text[: size - len(data)]
        ext = ".bin" if i % 2 == 0 else ".txt"
        with open(os.path.join(d, f"f{i:05d}{ext}"), "wb") as f:
            f.write(data)
    print(f"wrote {FILES} files, {TOTAL} bytes under {root}")


if __name__ == "__main__":
    main()
