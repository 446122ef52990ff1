"""mpipar.models: the GPT (serial and parallel), its training step, checkpoints and data.

Serial pieces (MLP, SelfAttention, GQAttention, SwiGLU, RMSNorm, GPT(cfg)) are plain
torch and import no MPI; `GPT(cfg, mesh)` builds the parallel model
(mpipar.models.parallel); mpipar.models.build picks one.
"""
from .serial import MLP, SelfAttention
from .config import GPTConfig
from .gpt import SerialGPT
from .parallel import ParallelGPT
from .build import GPT
from .serial import GQAttention, RMSNorm, SwiGLU
from .config import PRESETS, preset
from .train import clip_grad_norm, global_grad_norm, train_step
from .checkpoint import load, save
from .checkpoint import latest, load_full, save_step
from .data import CharCorpus
from .data import TokenFile
from .hf import LazyState, from_hf, load_pretrained, to_hf, to_hf_config
from .zero import optimizer

__all__ = ["MLP", "SelfAttention", "GPT", "GPTConfig", "SerialGPT", "train_step", "clip_grad_norm",
           "global_grad_norm", "save", "load", "CharCorpus",
           "save_step", "latest", "load_full"]
__all__ += ["ParallelGPT", "GQAttention", "RMSNorm", "SwiGLU", "PRESETS", "preset", "TokenFile",
            "from_hf", "to_hf", "to_hf_config", "load_pretrained", "LazyState"]
__all__ += ["optimizer"]
