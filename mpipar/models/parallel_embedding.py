"""The input end of a parallel GPT: vocab-parallel token embedding plus position rows."""
from __future__ import annotations

import torch
from torch import nn

from ..tensor import VocabParallelEmbedding


class Embedding(nn.Module):
    """Vocab-parallel token embedding plus this rank's rows of the position embedding (if any:
    rotary models have none)."""

    def __init__(self, tok: VocabParallelEmbedding, pos: nn.Embedding | None, positions: torch.Tensor):
        super().__init__()
        self.tok, self.pos = tok, pos
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        return x if self.pos is None else x + self.pos(self.positions)
