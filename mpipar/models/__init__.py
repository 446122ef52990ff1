"""mpipar.models: the GPT (serial and parallel), its training step, checkpoints and data.

Serial pieces (MLP, SelfAttention, GPT(cfg)) are plain torch and import no MPI;
`GPT(cfg, mesh)` builds the parallel model (mpipar.models.parallel).
"""
from .serial import MLP, SelfAttention
from .gpt import GPT, GPTConfig, SerialGPT
from .train import clip_grad_norm, global_grad_norm, train_step
from .checkpoint import load, save
from .data import CharCorpus
from .zero import optimizer

__all__ = ["MLP", "SelfAttention", "GPT", "GPTConfig", "SerialGPT", "train_step", "clip_grad_norm",
           "global_grad_norm", "save", "load", "CharCorpus",
           "optimizer"]
