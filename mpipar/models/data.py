"""A tiny built-in character corpus, generated in code (no downloads).

    corpus = CharCorpus(num_chars=200_000, seed=0)
    tokens, targets = corpus.batch(step, batch_size=16, seq_len=64)   # same on every rank

The text mixes short sentences from a small grammar ("the quick fox sees a
red bird.") with addition facts ("17+25=42."), so a small GPT has structure to
learn: word spelling, agreement of the grammar, and digits that depend on
earlier digits. Characters map to ids in sorted order; the vocabulary is padded
to a multiple of `pad_vocab_to` (ids that never occur) so it divides any
tensor-parallel size up to that multiple. Batches are windows at offsets drawn
from a generator seeded by (seed, step): every rank gets the same batch.
"""
from __future__ import annotations

import random

import torch

SUBJECTS = ("the fox", "a bird", "the old man", "my cat", "the robot", "a child", "the queen", "our dog")
VERBS = ("sees", "likes", "chases", "finds", "draws", "paints", "hears", "follows")
ADJECTIVES = ("red", "quick", "small", "happy", "green", "quiet", "brave", "lazy")
OBJECTS = ("bird", "tree", "river", "house", "ball", "star", "moon", "boat")


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}. "


def _sum(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}. "


def generate_text(num_chars: int, seed: int = 0) -> str:
    """Deterministic text of at least `num_chars` characters (then cut to exactly that)."""
    rng = random.Random(seed)
    parts, n = [], 0
    while n < num_chars:
        piece = _sentence(rng) if rng.random() < 0.7 else _sum(rng)
        if rng.random() < 0.1:
            piece += "\n"
        parts.append(piece)
        n += len(piece)
    return "".join(parts)[:num_chars]


class CharCorpus:
    """The generated text as ids, with a character vocabulary and deterministic batches."""

    def __init__(self, num_chars: int = 200_000, seed: int = 0, pad_vocab_to: int = 64):
        self.text = generate_text(num_chars, seed)
        self.chars = sorted(set(self.text))
        self.vocab_size = -(-len(self.chars) // pad_vocab_to) * pad_vocab_to
        self._index = {c: i for i, c in enumerate(self.chars)}
        self.data = self.encode(self.text)
        self.seed = seed

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in torch.as_tensor(ids).tolist())

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) [batch_size, seq_len]: windows and the same windows shifted by one."""
        if seq_len + 1 > len(self.data):
            raise ValueError(f"seq_len {seq_len} is longer than the corpus ({len(self.data)} chars)")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.data) - seq_len - 1, (batch_size,), generator=gen)
        windows = torch.stack([self.data[s:s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TokenFile:
    """A flat binary file of token ids (nanoGPT / Megatron convention), read through a memmap.

        data = TokenFile("train.bin", dtype="uint16")   # or "uint32" (vocabularies over 65536)
        tokens, targets = data.batch(step, batch_size, seq_len, seed=0)

    A batch is `batch_size` windows of seq_len + 1 consecutive ids at offsets
    drawn from a generator seeded by (seed, step): the same on every rank, so
    each rank takes its dp / sp share of the same batch (models.train_step).
    """

    DTYPES = ("uint16", "uint32")

    def __init__(self, path: str, dtype: str = "uint16"):
        import numpy as np

        from ..errors import require

        require(dtype in self.DTYPES, f"TokenFile: dtype must be one of {self.DTYPES}, got {dtype!r}")
        self.path, self.dtype = path, dtype
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")

    def __len__(self) -> int:
        return len(self.data)

    def max_id(self) -> int:
        """Largest id in the file (reads it all)."""
        return int(self.data.max()) if len(self.data) else -1

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) int64 [batch_size, seq_len]: windows of the file and the same shifted by one."""
        from ..errors import require

        require(seq_len + 1 <= len(self.data),
                f"TokenFile: seq_len {seq_len} needs at least {seq_len + 1} tokens, {self.path} has {len(self.data)}")
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        starts = torch.randint(0, len(self.data) - seq_len, (batch_size,), generator=gen).tolist()
        windows = torch.stack([torch.from_numpy(self.data[s:s + seq_len + 1].astype("int64")) for s in starts])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
