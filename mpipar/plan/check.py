"""Published runs the model is checked against, and the predicted-vs-measured hook of train_gpt.

NARAYANAN_2021: Narayanan et al., "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM" (SC'21), Table 1: GPT models with
vocabulary 51,200 and sequence 2,048 on DGX A100 nodes (Selene), fp16, full
activation recompute, achieved teraFLOP/s per GPU counted with the paper's
formula 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) per step. The table does not
give micro-batch sizes or the schedule; we assume micro-batch 1 and 1F1B
(the setting of the paper's Megatron-LM scripts), see docs/plan.md.
"""
from __future__ import annotations

from .estimate import estimate
from .spec import Layout, ModelSpec
from .system import System

# (name, heads, hidden, layers, tp, pp, gpus, batch, published teraFLOP/s per GPU)
NARAYANAN_2021 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
    ("18B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("76B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("145B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("310B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("530B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    ("1T", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]

# what Megatron-LM did in 2021: unfused (materialised) softmax attention, gradients
# all-reduced in fp32 after the backward in one flat buffer, accumulated into fp32 main_grad buffers
# (fp16 weight gradient read, fp32 main_grad read and written per microbatch: 10 bytes; the
# gradient-accumulation fusion into the wgrad GEMM came later), scatter-gather p2p
MEGATRON_2021 = {"attention": "unfused", "dp_overlap": 0.0, "bucket_bytes": 2**40, "grad_reduce_bytes": 4,
                 "p2p_scatter_gather": True, "grad_accumulation_bytes": 10}


def narayanan_flops(B: int, s: int, l: int, h: int, V: int) -> float:
    """FLOPs per step as Narayanan et al. count them (full recompute included)."""
    return 96.0 * B * s * l * h * h * (1 + s / (6.0 * h) + V / (16.0 * l * h))


def narayanan_table(system: System | str = "a100-80gb", micro_batch: int = 1, schedule: str = "1f1b") -> list[dict]:
    """Predicted next to published teraFLOP/s per GPU for every row of Table 1."""
    system = System.load(system) if isinstance(system, str) else system
    system = system.with_software(**MEGATRON_2021)
    rows = []
    for name, a, h, l, tp, pp, gpus, batch, published in NARAYANAN_2021:
        spec = ModelSpec(51200, 2048, h, a, l, tied=True)  # Megatron's GPT shares the embedding
        dp = gpus // (tp * pp)
        layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, global_batch=batch, recompute="full",
                        dtype="fp16", schedule=schedule)
        est = estimate(spec, system, layout)
        tflops = narayanan_flops(batch, 2048, l, h, 51200) / est.step_time / gpus / 1e12
        rows.append({"model": name, "tp": tp, "pp": pp, "dp": dp, "gpus": gpus, "batch": batch,
                     "published_tflops": published, "predicted_tflops": tflops,
                     "error": tflops / published - 1.0, "step_s": est.step_time, "estimate": est})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':>6} {'tp':>3} {'pp':>3} {'dp':>4} {'batch':>6} {'published':>10} {'predicted':>10} {'error':>7}"]
    for r in rows:
        lines.append(f"{r['model']:>6} {r['tp']:>3} {r['pp']:>3} {r['dp']:>4} {r['batch']:>6} "
                     f"{r['published_tflops']:>10.0f} {r['predicted_tflops']:>10.1f} {r['error']:>+7.1%}")
    errs = [abs(r["error"]) for r in rows]
    lines.append(f"mean |error| {sum(errs) / len(errs):.1%}, worst {max(errs):.1%}")
    return "\n".join(lines)
