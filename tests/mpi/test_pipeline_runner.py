"""PipelineRunner against the serial model: loss and every gradient to 1e-10 in float64.

Run as `mpiexec -n N python -m pytest --with-mpi tests/mpi/test_pipeline_runner.py`
for N in 1..4: the pipeline has N stages (the whole world).
"""
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpipar.errors import MpiparError
from mpipar.pipeline import PipelineRunner, partition, schedule
from mpipar.pipeline.weight_grad import WeightGradSplit

COMM = MPI.COMM_WORLD
P, RANK = COMM.Get_size(), COMM.Get_rank()
HIDDEN = 5
TOL = 1e-10


def mse(out, target):
    return nn.functional.mse_loss(out, target)


def serial_stack(num_linear, seed=0):
    """Linear layers of varied widths with Tanh between: an uneven parameter split."""
    g = torch.Generator().manual_seed(seed)
    widths = [HIDDEN] + [HIDDEN + (i % 3) for i in range(num_linear - 1)] + [HIDDEN]
    layers = []
    for i in range(num_linear):
        lin = nn.Linear(widths[i], widths[i + 1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        layers.append(lin)
        if i < num_linear - 1:
            layers.append(nn.Tanh())
    return layers


def data(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64),
            torch.randn(batch, HIDDEN, generator=g, dtype=torch.float64))


def reference(layers, x, y):
    """Serial loss and parameter gradients (by id of the parameter) on the whole batch."""
    model = nn.Sequential(*layers)
    model.zero_grad()
    loss = mse(model(x), y)
    loss.backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad()
    return loss.item(), grads


def stage_chunks(layers, v):
    parts = partition(layers, P * v)
    return [parts[c * P + RANK] for c in range(v)]


def microbatch_counts(name):
    if name == "interleaved-1f1b":
        return sorted({1, P, 2 * P})  # m < p, m == p, m a multiple of p
    return sorted({1, P + 1, 2 * P + 1})


CASES = [(name, m, v) for name, v in [("naive", 1), ("gpipe", 1), ("1f1b", 1), ("zb-h1", 1),
                                      ("interleaved-1f1b", 2), ("gpipe", 2)]
         for m in microbatch_counts(name)]


@pytest.mark.mpi
@pytest.mark.parametrize("name,m,v", CASES)
def test_matches_serial(name, m, v):
    layers = serial_stack(num_linear=2 * P * v + 1)  # odd: stages get uneven layer counts
    x, y = data(batch=2 * m)
    ref_loss, ref_grads = reference(layers, x, y)
    chunks = stage_chunks(layers, v)
    runner = PipelineRunner(chunks if v > 1 else chunks[0], COMM, schedule=name,
                            num_microbatches=m, loss_fn=mse)
    loss = runner.step(x, y)
    assert isinstance(loss, float)
    assert abs(loss - ref_loss) < TOL
    params = [p for chunk in chunks for p in chunk.parameters()]
    assert params
    for p in params:
        assert p.grad is not None
        assert torch.allclose(p.grad, ref_grads[id(p)], rtol=0, atol=TOL)
    assert runner._state == {}  # every microbatch's activations were released
    # the stage sizes differ somewhere, so the uneven split is exercised
    sizes = COMM.allgather([len(c) for c in chunks])
    if P * v > 1:
        assert len({n for row in sizes for n in row}) > 1
    runner.close()


@pytest.mark.mpi
def test_gradients_accumulate_over_steps():
    layers = serial_stack(num_linear=2 * P + 1)
    x, y = data(batch=4)
    _, ref_grads = reference(layers, x, y)
    (chunk,) = stage_chunks(layers, 1)
    runner = PipelineRunner(chunk, COMM, schedule="1f1b", num_microbatches=2, loss_fn=mse)
    runner.step(x, y)
    runner.step(x, y)
    for p in chunk.parameters():
        assert torch.allclose(p.grad, 2 * ref_grads[id(p)], rtol=0, atol=TOL)


@pytest.mark.mpi
def test_float32_runs_and_matches_loosely():
    torch.manual_seed(0)  # the same layers on every rank
    layers = [nn.Linear(HIDDEN, HIDDEN) for _ in range(P + 1)]
    x, y = (t.float() for t in data(batch=6))
    model = nn.Sequential(*layers)
    ref = mse(model(x), y).item()
    (chunk,) = stage_chunks(layers, 1)
    loss = PipelineRunner(chunk, COMM, schedule="gpipe", num_microbatches=3, loss_fn=mse).step(x, y)
    assert abs(loss - ref) < 1e-5


@pytest.mark.mpi
def test_batch_not_divisible_raises_everywhere():
    (chunk,) = stage_chunks(serial_stack(num_linear=P + 1), 1)
    runner = PipelineRunner(chunk, COMM, schedule="1f1b", num_microbatches=3, loss_fn=mse)
    x, y = data(batch=8)
    with pytest.raises(MpiparError, match="not divisible"):
        runner.step(x, y)
    x, y = data(batch=9)  # still usable afterwards: the check ran before any communication
    runner.step(x, y)


@pytest.mark.mpi
def test_bad_schedule_raises_everywhere():
    (chunk,) = stage_chunks(serial_stack(num_linear=P + 1), 1)
    with pytest.raises(MpiparError, match="unknown pipeline schedule"):
        PipelineRunner(chunk, COMM, schedule="2f2b", num_microbatches=2, loss_fn=mse)
    with pytest.raises(MpiparError, match="one chunk"):
        PipelineRunner([chunk, chunk], COMM, schedule="1f1b", num_microbatches=2, loss_fn=mse)
    if P > 1:
        with pytest.raises(MpiparError, match="equal on every stage"):
            PipelineRunner(chunk, COMM, schedule="gpipe", num_microbatches=2 + RANK, loss_fn=mse)
        with pytest.raises(MpiparError, match="divisible"):
            PipelineRunner([chunk, chunk], COMM, schedule="interleaved-1f1b",
                           num_microbatches=P + 1, loss_fn=mse)


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_shape_mismatch_between_stages_raises_everywhere(name):
    if P < 2:
        pytest.skip("needs two stages")
    # the last stage expects 7 features but receives HIDDEN: it fails, every stage must raise
    chunk = nn.Linear(HIDDEN if RANK < P - 1 else 7, HIDDEN, dtype=torch.float64)
    runner = PipelineRunner(chunk, COMM, schedule=name, num_microbatches=P + 1, loss_fn=mse)
    x, y = data(batch=P + 1)
    with pytest.raises(MpiparError, match=f"pipeline stage {P - 1} failed"):
        runner.step(x, y)
    with pytest.raises(MpiparError, match="unusable"):
        runner.step(x, y)


def test_weight_grad_split_defers_weight_work():
    """B computes input gradients only; W adds exactly the weight gradients of a full backward."""
    layers = serial_stack(num_linear=3)
    model = nn.Sequential(*layers)
    x = data(batch=4)[0].requires_grad_(True)
    g = torch.randn(4, HIDDEN, dtype=torch.float64)
    model(x).backward(g)
    ref_dx, ref = x.grad.clone(), [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    split = WeightGradSplit(model)
    x2 = x.detach().clone().requires_grad_(True)
    with split.record() as record:
        out = model(x2)
    dx, pending = split.input_grads(out, g, x2, record)
    assert torch.allclose(dx, ref_dx, rtol=0, atol=TOL)
    assert all(p.grad is None for p in model.parameters())
    split.weight_grads(pending)
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=0, atol=TOL)


def test_weight_grad_split_falls_back_for_reused_module():
    lin = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
    model = nn.Sequential(lin, nn.Tanh(), lin)  # one module called twice
    x = data(batch=3)[0]
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    split = WeightGradSplit(model)
    with split.record() as record:
        out = model(x).sum()
    _, pending = split.input_grads(out, None, None, record)
    assert pending is None  # full backward already done
    for p, r in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, r, rtol=0, atol=TOL)


def test_schedule_is_pure_data():
    assert [str(a) for a in schedule("1f1b", 2, 3, 0)] == ["F0", "F1", "B0", "F2", "B1", "B2"]


def traced_step(name, m, v=1, layers=None):
    from mpipar.trace import Tracer

    layers = layers or serial_stack(num_linear=2 * P * v + 1)
    chunks = stage_chunks(layers, v)
    tracer = Tracer(COMM)
    runner = PipelineRunner(chunks if v > 1 else chunks[0], COMM, schedule=name,
                            num_microbatches=m, loss_fn=mse, tracer=tracer)
    tracer.activations.reset_peak()
    runner.step(*data(batch=4 * m))
    return runner, tracer


@pytest.mark.mpi
@pytest.mark.parametrize("name,v", [("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_tracer_gets_every_action_and_message(name, v):
    m = 2 * P
    runner, tracer = traced_step(name, m, v)
    names = [s["name"] for s in tracer.spans]
    for op in ("F", "B", "W"):
        assert names.count(op) == sum(a.op == op for a in runner.actions)
    assert names.count("F") == m * v and names.count("step") == 1
    assert names.count("send") == sum(k == "send" for k, *_ in runner.plan)
    assert names.count("recv") == sum(k == "recv" for k, *_ in runner.plan)
    f_spans = [s for s in tracer.spans if s["name"] == "F"]
    assert sorted((s["microbatch"], s["chunk"]) for s in f_spans) == sorted(
        (i, c) for i in range(m) for c in range(v))
    assert all(s["stage"] == RANK and s["t_end"] >= s["t_start"] for s in tracer.spans)
    assert len(tracer.memory) == len(runner.actions)
    assert tracer.activations.current == 0  # every saved activation was released


@pytest.mark.mpi
def test_a_disabled_tracer_records_and_meters_nothing():
    """A runner given a tracer that is off (the benchmark's timed steps) takes no span, no memory
    sample and no saved-tensor hook; with spans alone, every action's span and nothing else; traced
    again, every action's memory too."""
    from mpipar.trace import Tracer

    chunks = stage_chunks(serial_stack(num_linear=2 * P + 1), 1)
    tracer = Tracer(COMM, enabled=False)
    runner = PipelineRunner(chunks[0], COMM, schedule="1f1b", num_microbatches=2, loss_fn=mse, tracer=tracer)
    tracer.activations.reset_peak()
    runner.step(*data(batch=8))
    assert (tracer.spans, tracer.memory, tracer.activations.peak) == ([], [], 0)
    tracer.enabled, tracer.memory_enabled = True, False  # spans alone: the benchmark's bubble steps
    runner.step(*data(batch=8))
    names = [s["name"] for s in tracer.spans]
    assert names.count("F") + names.count("B") + names.count("W") == len(runner.actions)
    assert (tracer.memory, tracer.activations.peak) == ([], 0)
    assert all(s["cpu_s"] >= 0 for s in tracer.spans)
    # a send and its receive name the same message: the destination's virtual stage
    sent = [(s["direction"], s["microbatch"], s["virtual"]) for s in tracer.spans if s["name"] == "send"]
    received = [(s["direction"], s["microbatch"], s["virtual"]) for s in tracer.spans if s["name"] == "recv"]
    everyone = COMM.allgather((sent, received))
    assert sorted(k for s, _ in everyone for k in s) == sorted(k for _, r in everyone for k in r)
    assert len(sent) == sum(k == "send" for k, *_ in runner.plan)
    tracer.memory_enabled = True
    runner.step(*data(batch=8))
    assert len(tracer.memory) == len(runner.actions) and tracer.activations.peak > 0
    runner.close()


@pytest.mark.mpi
def test_1f1b_holds_fewer_activations_than_gpipe():
    if P < 2:
        pytest.skip("needs two stages")
    m = 2 * P
    layers = serial_stack(num_linear=2 * P + 1)
    peaks = {name: traced_step(name, m, layers=layers)[1].activations.peak for name in ("gpipe", "1f1b")}
    # stage s keeps min(p - s, m) microbatches alive under 1F1B, all m under GPipe
    assert peaks["1f1b"] <= (P - RANK) / m * peaks["gpipe"] * 1.1
    assert peaks["1f1b"] < peaks["gpipe"]
    assert peaks["gpipe"] > 0


@pytest.mark.mpi
def test_zb_h1_really_splits_weight_gradients(monkeypatch):
    calls = []
    original = WeightGradSplit.weight_grads

    def counting(pending):
        calls.append(len(pending or ()))
        original(pending)

    monkeypatch.setattr(WeightGradSplit, "weight_grads", staticmethod(counting))
    m = P + 1
    layers = serial_stack(num_linear=2 * P + 1)
    x, y = data(batch=2 * m)
    ref_loss, ref_grads = reference(layers, x, y)
    (chunk,) = stage_chunks(layers, 1)
    runner = PipelineRunner(chunk, COMM, schedule="zb-h1", num_microbatches=m, loss_fn=mse)
    assert abs(runner.step(x, y) - ref_loss) < TOL
    linears = sum(isinstance(mod, nn.Linear) for mod in chunk)
    assert calls == [linears] * m  # every W did the weight work of every Linear of the stage
    for p in chunk.parameters():
        assert torch.allclose(p.grad, ref_grads[id(p)], rtol=0, atol=TOL)


def test_partition_keeps_every_layer_in_order():
    layers = serial_stack(num_linear=5)  # 9 modules, 5 with parameters
    for k in range(1, len(layers) + 1):
        for by in ("params", "layers", [1.0] * len(layers)):
            parts = partition(layers, k, by=by)
            assert len(parts) == k and all(len(p) > 0 for p in parts)
            assert [m for p in parts for m in p] == layers  # same objects, same order
    assert [len(p) for p in partition(layers, 3, boundaries=[2, 5])] == [2, 3, 4]
    assert [len(p) for p in partition(layers, 3, boundaries=[0, 2, 5, 9])] == [2, 3, 4]
    assert [len(p) for p in partition(layers, 3, by="layers")] == [3, 3, 3]
    for bad in ([5, 2], [0, 9], [2]):
        with pytest.raises(MpiparError):
            partition(layers, 3, boundaries=bad)
    with pytest.raises(MpiparError):
        partition(layers, len(layers) + 1)


def test_partition_balances_parameters():
    layers = [nn.Linear(4, 4), nn.Linear(4, 40), nn.Linear(40, 4), nn.Linear(4, 4), nn.Tanh()]
    parts = partition(layers, 2)
    counts = [sum(p.numel() for p in part.parameters()) for part in parts]
    assert counts == [20 + 200, 164 + 20]  # the best of the 4 possible cuts
    assert isinstance(parts[1][-1], nn.Tanh)  # a parameter-free layer stays with the one before it
