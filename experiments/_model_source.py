"""What train_gpt.py trains: the model config (preset, JSON, flags or a Hugging Face folder),
its initial weights (--init-from) and the token data (--data FILE or the built-in corpus)."""
from __future__ import annotations

import json
import os

from mpipar import models
from mpipar.errors import require


class Source:
    """`batch(step, batch_size, seq_len)`, `config` (models.GPTConfig) and `state` (full weights or None)."""

    def __init__(self, cfg):
        self.seed, self.state = cfg.seed, None
        if cfg.data:
            self.data = models.TokenFile(cfg.data, cfg.data_dtype)
            vocab = -(-(self.data.max_id() + 1) // 64) * 64  # padded: divides every tp up to 64
        else:
            self.data = models.CharCorpus(num_chars=200_000, seed=cfg.seed)
            vocab = self.data.vocab_size
        if cfg.init_from:
            self.config, self.state = models.load_pretrained(cfg.init_from, seq_len=cfg.seq, seed=cfg.seed,
                                                                 lazy=True)
            require(self.config.seq_len == cfg.seq, f"--seq {cfg.seq} != the model's {self.config.seq_len}")
            require(vocab <= self.config.vocab_size or not cfg.data,
                    f"{cfg.data} has ids up to {vocab - 1}, the model's vocabulary is {self.config.vocab_size}")
            if not cfg.data:
                require(self.data.vocab_size <= self.config.vocab_size, "the corpus does not fit the vocabulary")
        elif cfg.model:
            kw = dict(vocab_size=vocab, seq_len=cfg.seq, seed=cfg.seed)
            if os.path.isfile(cfg.model):
                with open(cfg.model) as f:
                    self.config = models.GPTConfig(**{**kw, **json.load(f)})
            else:
                self.config = models.preset(cfg.model, **kw)
        else:
            ffn = None if cfg.arch == "gpt2" else -(-8 * cfg.hidden // 3 // 64) * 64
            self.config = models.GPTConfig(vocab, cfg.seq, cfg.hidden, cfg.heads, cfg.layers, ffn_hidden=ffn,
                                           tied=cfg.tied, seed=cfg.seed, arch=cfg.arch)

    def batch(self, step: int, batch_size: int, seq_len: int):
        if isinstance(self.data, models.TokenFile):
            return self.data.batch(step, batch_size, seq_len, seed=self.seed)
        return self.data.batch(step, batch_size, seq_len)

    def load_into(self, model) -> None:
        """The --init-from weights into `model` (each rank keeps its shard)."""
        if self.state is not None:
            model.load_full_state_dict(self.state)
