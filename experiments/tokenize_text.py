#!/usr/bin/env python3
"""Turn a text file into a token file for models.TokenFile / train_gpt.py --data (no network).

    python experiments/tokenize_text.py corpus.txt -o tokens.bin                     # UTF-8 bytes (ids 0-255)
    python experiments/tokenize_text.py corpus.txt -o tokens.bin --tokenizer DIR     # a local tokenizer

DIR is a folder with a tokenizer.json (read by `tokenizers`) or anything
transformers' AutoTokenizer loads from disk (local_files_only). The ids are
written flat as uint16 when they fit (the nanoGPT convention), else uint32;
the dtype and vocabulary size are printed for --data-dtype and the model.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def encode(text: str, tokenizer: str | None) -> tuple[np.ndarray, int]:
    """(ids, vocabulary size) of `text`."""
    if not tokenizer:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), 256
    path = os.path.join(tokenizer, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        return np.asarray(tok.encode(text).ids, dtype=np.int64), tok.get_vocab_size()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return np.asarray(tok(text)["input_ids"], dtype=np.int64), len(tok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", help="input text file (UTF-8)")
    p.add_argument("-o", "--out", required=True, help="output token file")
    p.add_argument("--tokenizer", default="", help="local tokenizer folder (default: UTF-8 bytes)")
    a = p.parse_args()
    with open(a.text, encoding="utf-8") as f:
        ids, vocab = encode(f.read(), a.tokenizer)
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    ids.astype(dtype).tofile(a.out)
    print(f"{a.out}: {len(ids)} tokens, vocabulary {vocab}, --data-dtype {np.dtype(dtype).name}")


if __name__ == "__main__":
    main()
