"""One pipeline chunk of a parallel GPT: [embedding], its blocks, [head]; the unit the runner runs."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .gpt import autocast_context, run_blocks


@dataclasses.dataclass
class Runtime:
    """Options shared by a model and its chunks, changeable between steps."""

    activation_checkpointing: bool = False
    autocast_dtype: torch.dtype | None = None


class Chunk(nn.Module):
    """One pipeline chunk: [embedding], its blocks, [head]. The unit PipelineRunner runs."""

    def __init__(self, blocks, runtime: Runtime, embedding: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.embedding, self.head = embedding, head
        self.blocks = nn.ModuleList(blocks)
        self.runtime = runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        with autocast_context(self.runtime.autocast_dtype, device):
            if self.embedding is not None:
                x = self.embedding(x)
            x = run_blocks(self.blocks, x, self.runtime.activation_checkpointing)
            if self.head is not None:
                x = self.head(x)
        return x
