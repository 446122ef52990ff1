"""GPT(cfg, mesh): the serial GPT laid out over a tp x sp x dp x pp mesh, with the same numbers.

- tensor parallelism (mesh.tp): vocab-parallel embedding, head and loss;
  attention split by heads, MLP column/row parallel (Megatron; for llama
  SwiGLU's gate and up column-, down row-parallel, and grouped K/V heads
  sharded or replicated: mpipar.tensor.gqa); Megatron
  sequence parallelism (`sequence_parallel`, default on when tp > 1): between
  the TP regions each tp rank holds a block of the sequence.
- sequence parallelism (mesh.sp): each sp rank holds its part of the sequence
  (zigzag by default); attention runs as ring attention or Ulysses (`sp_mode`).
- pipeline parallelism (mesh.pp): the layers are cut into pp * num_chunks
  contiguous virtual stages; chunk c on stage s is virtual stage c*pp + s.
- data parallelism (mesh.dp): each dp rank takes its share of the batch; the
  gradients of the parameters replicated over dp x sp are averaged in buckets
  that overlap the backward (`GradBuckets`).

Every rank builds only its own layers, each from its serial counterpart
(seeded from cfg.seed), and keeps its shard. Parameter names are the serial
names (e.g. blocks.3.attn.qkv.weight holds this rank's shard of that tensor),
except the tied head's copy on the last stage ("tied_head.weight").
"""
from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn

from .. import comm
from ..errors import require
from ..agree import agree, agree_ints
from ..flight.recorder import recorded
from ..mesh import Group
from ..pipeline.partition import balanced_edges
from ..sequence.layout import local_positions
from ..tensor import VocabParallelEmbedding, vocab_parallel_cross_entropy
from .data_parallel import DEFAULT_BUCKET_BYTES
from .config import GPTConfig
from .layout_check import SP_MODES, layout_error
from .gpt import Block, check_state, make_embeddings, make_head, make_norm, param_names
from .shards import assemble, parallel_specs, take_shard
from .chunk import Chunk, Runtime
from .parallel_block import ParallelBlock, Parallelism, quiet
from .parallel_embedding import Embedding
from .parallel_head import Head, TiedProjection, make_head_projection
from .zero.attach import attach as attach_buckets

class ParallelGPT(nn.Module):
    """The GPT of `cfg` on this rank's share of `mesh` (see the module doc).

    Options: sp_mode "ring" | "ulysses"; sp_layout "zigzag" | "contiguous";
    sequence_parallel (Megatron SP, default tp > 1); bucket_bytes (data-parallel
    buckets); activation_checkpointing; autocast_dtype; dtype and device
    (default: mesh.device); boundaries (explicit layer cut points of the
    pp * num_chunks virtual stages, default: balanced by layer count);
    zero (0-3: ZeRO stage over the data-parallel group, mpipar.models.zero).
    """

    def __init__(self, cfg: GPTConfig, mesh, num_chunks: int = 1, *, sp_mode: str = "ring",
                 sp_layout: str = "zigzag", sequence_parallel: bool | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, activation_checkpointing: bool = False,
                 autocast_dtype: torch.dtype | None = None, dtype=None, device=None, boundaries=None,
                 zero: int = 0):
        super().__init__()
        require(isinstance(cfg, GPTConfig), f"GPT: expected a GPTConfig, got {type(cfg).__name__}")
        shape = dict(mesh.shape)
        seq_par = shape["tp"] > 1 if sequence_parallel is None else bool(sequence_parallel)
        err = layout_error(cfg, shape, num_chunks, sp_mode, sp_layout, seq_par)
        agree(mesh.world.comm, None if err is None else f"GPT(cfg, mesh): {err}")  # every rank raises
        _agree_config(mesh, cfg, num_chunks, seq_par, sp_mode)
        self.cfg, self.mesh, self.num_chunks = cfg, mesh, num_chunks
        self.sequence_parallel, self.sp_mode, self.sp_layout = seq_par, sp_mode, sp_layout
        self.runtime = Runtime(activation_checkpointing, autocast_dtype)
        self.par = Parallelism(mesh.tp, mesh.sp, sp_mode, sp_layout, seq_par)
        device = mesh.device if device is None else device
        stage, p = mesh.coords["pp"], shape["pp"]
        edges = balanced_edges([1.0] * cfg.num_layers, p * num_chunks) if boundaries is None \
            else _edges(boundaries, cfg.num_layers, p * num_chunks)
        self.layer_ranges = [(edges[c * p + stage], edges[c * p + stage + 1]) for c in range(num_chunks)]
        self.first, self.last = stage == 0, stage == p - 1
        self.blocks = nn.ModuleDict()
        for lo, hi in self.layer_ranges:
            for i in range(lo, hi):
                self.blocks[str(i)] = ParallelBlock(Block(cfg, i, dtype), self.par)
        self._build_ends(dtype)
        self.to(device)
        self._chunks = self._make_chunks()
        self._specs = None
        self.data_group = _data_group(mesh)
        self.tied_group = _tied_group(mesh) if cfg.tied and p > 1 else None
        self.zero = zero
        self.buckets = attach_buckets(self, zero, bucket_bytes)  # GradBuckets, or ZeRO's sharded ones
        self._runners = {}

    # ---- construction ------------------------------------------------------------------------
    def _build_ends(self, dtype) -> None:
        cfg, par = self.cfg, self.par
        tok = pos = None
        if self.first or (self.last and cfg.tied):
            tok, pos = make_embeddings(cfg, dtype)
        if self.first:
            self.tok_emb = quiet(VocabParallelEmbedding.from_serial(tok, par.tp,
                                                                     sequence_parallel=par.sequence_parallel))
            self.pos_emb = pos
        if self.last:
            self.ln_f = make_norm(cfg, dtype)
            if not cfg.tied:
                self.head = make_head_projection(make_head(cfg, dtype), par)
            elif self.first:
                self.tied_head = TiedProjection(par, source=self.tok_emb)
            else:
                self.tied_head = TiedProjection(par, weight=self._vocab_shard(tok.weight))

    def _vocab_shard(self, full: torch.Tensor) -> torch.Tensor:
        from ..tensor import shard

        return shard(full.detach(), self.par.tp, 0)

    def _make_chunks(self) -> list:
        chunks = []
        for c, (lo, hi) in enumerate(self.layer_ranges):
            embedding = head = None
            if self.first and c == 0:
                embedding = Embedding(self.tok_emb, self.pos_emb, self._positions())
            if self.last and c == self.num_chunks - 1:
                head = Head(self.ln_f, self.head if not self.cfg.tied else self.tied_head)
            blocks = [self.blocks[str(i)] for i in range(lo, hi)]
            chunks.append(Chunk(blocks, self.runtime, embedding, head))
        return chunks

    def _positions(self) -> torch.Tensor:
        sp, tp = self.mesh.sp, self.mesh.tp
        pos = local_positions(self.cfg.seq_len, sp.rank, sp.size, self.sp_layout) if sp.size > 1 \
            else torch.arange(self.cfg.seq_len)
        if self.sequence_parallel:
            pos = pos.chunk(tp.size)[tp.rank]
        return pos.to(self.tok_emb.weight.device)

    # ---- use ---------------------------------------------------------------------------------
    @property
    def chunks(self) -> list:
        """This stage's chunk modules (virtual stages c*pp + stage), for PipelineRunner."""
        return list(self._chunks)

    @property
    def activation_checkpointing(self) -> bool:
        return self.runtime.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.runtime.activation_checkpointing = bool(value)

    @property
    def autocast_dtype(self):
        return self.runtime.autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, value) -> None:
        self.runtime.autocast_dtype = value

    def forward(self, local_tokens: torch.Tensor) -> torch.Tensor:
        """pp == 1 only: this rank's tokens [b, local_seq] -> this rank's logits [b, local_seq, V/tp]."""
        require(self.mesh.pp.size == 1, "ParallelGPT.forward: with pp > 1 use models.train_step (a pipeline)")
        x = local_tokens
        for chunk in self._chunks:
            x = chunk(x)
        return x

    def loss_fn(self, logits_shard: torch.Tensor, local_targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over this rank's tokens from its vocab shard of the logits."""
        return vocab_parallel_cross_entropy(logits_shard, local_targets, self.mesh.tp).mean()

    def local_batch(self, tokens: torch.Tensor, targets: torch.Tensor):
        """This rank's share of a full batch: its dp rows and its sp part of the sequence."""
        from ..sequence import shard_sequence

        dp, sp = self.mesh.dp, self.mesh.sp
        tokens, targets = (t.tensor_split(dp.size, dim=0)[dp.rank] for t in (tokens, targets))
        if sp.size > 1:
            tokens, targets = (shard_sequence(t, sp, dim=1, layout=self.sp_layout) for t in (tokens, targets))
        device = self.mesh.device
        return tokens.to(device), targets.to(device)

    def specs(self) -> list:
        """ParamSpec of every local parameter (serial names and shard geometry)."""
        if self._specs is None:
            aliases = {"tied_head.weight": ("tok_emb.weight", False)}
            tp = self.mesh.tp
            self._specs = parallel_specs(self, tp.rank, tp.size, self.sequence_parallel, aliases)
        return self._specs

    def runner(self, schedule: str, num_microbatches: int):
        """The (cached) PipelineRunner of this stage for `schedule` and `num_microbatches`."""
        from ..pipeline import PipelineRunner

        key = (schedule, num_microbatches)
        if key not in self._runners:
            self._runners[key] = PipelineRunner(self.chunks if self.num_chunks > 1 else self._chunks[0],
                                                self.mesh.pp, schedule=schedule,
                                                num_microbatches=num_microbatches, loss_fn=self.loss_fn)
        return self._runners[key]

    def close(self) -> None:
        """Collective over the mesh: remove the gradient hooks, move ZeRO's buckets out of shared
        memory, free the pipeline runners' communicators; the model is done (ZeRO-3 can no longer
        gather its parameters). Call it before `mesh.close()`."""
        self.buckets.close()
        for runner in self._runners.values():
            runner.close()
        self._runners = {}

    # ---- gradients ---------------------------------------------------------------------------
    def start_grad_sync(self, num_microbatches: int) -> None:
        """Arm the data-parallel buckets for a step of `num_microbatches` backward passes."""
        self.buckets.start(num_microbatches)

    def finish_grad_sync(self) -> None:
        """Complete every gradient reduction: dp x sp mean, tp sum of SP-replicated, tied sum."""
        self.buckets.finish()
        if self.zero:
            return  # ZeRO's buckets did all three on the gradient shards
        reduce = [s.param for s in self.specs() if s.sp_reduce and s.param.grad is not None]
        if reduce:
            flat = torch.cat([p.grad.reshape(-1) for p in reduce])
            comm.all_reduce(flat, self.mesh.tp)
            _unflatten_into(flat, [p.grad for p in reduce])
        if self.tied_group is not None:
            w = self.tok_emb.weight if self.first else self.tied_head.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            comm.all_reduce(w.grad, self.tied_group)

    def full_state_dict(self) -> dict:
        """The serial model's state_dict, gathered on every rank (collective over the mesh).

        One all-gather over tp of every shard packed together, one allgather over pp.
        """
        if self.zero == 3:
            with self.buckets.gathered():  # ZeRO-3 holds only shards between uses
                return self._full_state_dict()
        return self._full_state_dict()

    def _full_state_dict(self) -> dict:
        specs = [s for s in self.specs() if s.primary]
        sharded = [s for s in specs if s.sharded]
        local = {s.name: s.param.detach().cpu().clone() for s in specs if not s.sharded}
        if sharded:
            flat = torch.cat([s.param.detach().reshape(-1) for s in sharded]).cpu()
            rows = comm.all_gather(flat.unsqueeze(0), self.mesh.tp, dim=0)
            offset = 0
            for s in sharded:
                n = s.param.numel()
                pieces = [row[offset:offset + n].view(s.param.shape) for row in rows][::s.replicas]
                local[s.name] = assemble(pieces, s.dim, s.stride).clone()
                offset += n
        merged = {}
        for part in recorded(self.mesh.pp, "full_state_dict", self.mesh.pp.comm.allgather, local):
            merged.update(part)
        device = next(self.parameters()).device
        return {k: merged[k].to(device) for k in param_names(self.cfg)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict) -> None:
        """Set every local parameter from the serial-named full tensors of `state` (e.g. models.from_hf).

        Each rank copies only its shard; nothing is communicated except the
        agreement that `state` fits the config (MpiparError on every rank if not).
        """
        err = None
        try:
            check_state(state, self.cfg)
        except Exception as exc:  # noqa: BLE001  (reported on every rank below)
            err = str(exc)
        agree(self.mesh.world.comm, err)
        with self.buckets.gathered() if self.zero else contextlib.nullcontext():  # ZeRO-3: materialised
            for s in self.specs():
                dim = s.dim if s.sharded else None
                local = state.shard(s.name, s.part, s.parts, dim, s.stride) if hasattr(state, "shard") \
                    else take_shard(state[s.name], s.part, s.parts, dim, s.stride)
                s.param.copy_(local.to(dtype=s.param.dtype, device=s.param.device))
            if self.zero:
                self.buckets.params_written()  # the shards and master weights follow


def _unflatten_into(flat: torch.Tensor, tensors) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _edges(boundaries, num_layers: int, num_virtual: int) -> list[int]:
    from ..pipeline.partition import _edges_from_boundaries

    return _edges_from_boundaries(list(boundaries), num_layers, num_virtual)


def _agree_config(mesh, cfg: GPTConfig, num_chunks: int, seq_par: bool, sp_mode: str) -> None:
    """Collective: the model arguments must be equal on every rank of the mesh."""
    vals = [cfg.vocab_size, cfg.seq_len, cfg.hidden, cfg.num_heads, cfg.num_layers, cfg.ffn_hidden,
            cfg.seed, int(cfg.tied), num_chunks, int(seq_par), SP_MODES.index(sp_mode), cfg.num_kv_heads,
            zlib.crc32(repr((cfg.arch, float(cfg.rope_theta), float(cfg.norm_eps), cfg.activation)).encode())]
    agree_ints(mesh.world.comm, vals, lambda lo, hi: "GPT(cfg, mesh): the config differs across ranks "
                                                     f"(min {lo.tolist()}, max {hi.tolist()})")


def _data_group(mesh) -> Group:
    """The ranks holding the same parameters: the dp x sp plane of this (pp, tp) coordinate."""
    color = mesh.coords["pp"] * mesh.shape["tp"] + mesh.coords["tp"]
    return mesh.world.split(color, mesh.world.rank, "dp*sp")


def _tied_group(mesh) -> Group | None:
    """First and last pipeline stage (same tp, sp, dp coordinates): the tied embedding's holders."""
    from mpi4py import MPI

    pp = mesh.pp
    return pp.split(0 if pp.rank in (0, pp.size - 1) else MPI.UNDEFINED, pp.rank, "tied")

