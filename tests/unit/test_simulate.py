"""The pipeline simulator reproduces the papers' bubbles and memory: pure tests, no MPI."""
import pytest

from mpipar.errors import MpiparError
from mpipar.pipeline import Action, simulate, simulate_actions

P_RANGE = range(1, 9)
M_RANGE = range(1, 33)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble(name):
    for p in P_RANGE:
        for m in M_RANGE:
            r = simulate(name, p, m, f=1.0, b=2.0, w=0.0, comm=0.0)
            assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
            assert r.makespan == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_interleaved_bubble(v):
    for p in P_RANGE:
        for m in range(p, 33, p):
            r = simulate("interleaved-1f1b", p, m, num_chunks=v, f=1.0, b=2.0)
            assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9), (p, m, v)


def test_interleaved_beats_1f1b():
    for p in range(2, 9):
        for m in range(p, 33, p):
            one = simulate("1f1b", p, m)
            two = simulate("interleaved-1f1b", p, m, num_chunks=2)
            assert two.bubble_fraction < one.bubble_fraction


def test_naive_bubble():
    for p in P_RANGE:
        for m in (1, 3, 8):
            r = simulate("naive", p, m)
            assert r.makespan == pytest.approx(m * p * 3.0)
            assert r.bubble_fraction == pytest.approx((p - 1) / p)


def test_peak_inflight_1f1b_and_gpipe():
    for p in P_RANGE:
        for m in M_RANGE:
            one = simulate("1f1b", p, m)
            gpipe = simulate("gpipe", p, m)
            for s in range(p):
                assert one.peak_inflight[s] == min(p - s, m)
                assert one.peak_inflight[s] <= p - s
                assert gpipe.peak_inflight[s] == m


def test_zb_h1_smaller_bubble_same_peak_memory():
    for p in range(2, 9):
        for m in M_RANGE:
            one = simulate("1f1b", p, m, f=1.0, b=1.0, w=1.0)
            zb = simulate("zb-h1", p, m, f=1.0, b=1.0, w=1.0)
            assert zb.bubble_fraction < one.bubble_fraction, (p, m)
            assert max(zb.peak_inflight) <= max(one.peak_inflight), (p, m)
            if m >= p:  # the paper's ZB-H1 bubble: (p-1)(T_F + T_B - T_W)
                assert zb.makespan == pytest.approx(3.0 * m + (p - 1) * (1.0 + 1.0 - 1.0))


def test_zb_h1_without_w_cost_matches_1f1b():
    for p in range(1, 6):
        for m in range(1, 12):
            assert simulate("zb-h1", p, m).makespan == pytest.approx(simulate("1f1b", p, m).makespan)


def test_w_folds_into_b_without_w_actions():
    r = simulate("1f1b", 1, 2, f=1.0, b=2.0, w=0.5)
    assert [(str(a), s, e) for a, s, e in r.timeline[0]] == [
        ("F0", 0.0, 1.0), ("B0", 1.0, 3.5), ("F1", 3.5, 4.5), ("B1", 4.5, 7.0)]
    z = simulate("zb-h1", 1, 1, f=1.0, b=2.0, w=0.5)
    assert [(str(a), e - s) for a, s, e in z.timeline[0]] == [("F0", 1.0), ("B0", 2.0), ("W0", 0.5)]


def test_comm_cost_on_the_critical_path():
    for p in range(1, 6):
        r = simulate("gpipe", p, 1, f=1.0, b=2.0, comm=0.5)
        assert r.makespan == pytest.approx(p * 3.0 + 2 * (p - 1) * 0.5)
    # chunks on one stage hand over locally: no comm cost
    r = simulate("interleaved-1f1b", 1, 2, num_chunks=2, comm=10.0)
    assert r.makespan == pytest.approx(6.0)


def test_timeline_respects_order_and_dependencies():
    p, m, v = 3, 6, 2
    r = simulate("interleaved-1f1b", p, m, num_chunks=v, f=1.0, b=2.0, comm=0.25)
    end = {}
    for s, row in enumerate(r.timeline):
        for (a, start, stop), (_, next_start, _) in zip(row, row[1:]):
            assert stop <= next_start + 1e-12
        for a, start, stop in row:
            assert stop - start == pytest.approx((1.0 if a.op == "F" else 2.0) / v)
            end[(s, a)] = (start, stop)
    for s in range(p):
        for a in (x for x, _, _ in r.timeline[s] if x.op == "F"):
            k = a.chunk * p + s
            if k > 0:
                ps, pc = (k - 1) % p, (k - 1) // p
                assert end[(s, a)][0] >= end[(ps, Action("F", a.microbatch, pc))][1] + 0.25 - 1e-12
    busy = sum(r.busy)
    assert r.bubble_fraction == pytest.approx(1 - busy / (p * r.makespan))


def test_interleaved_peak_counts_chunks_as_fractions():
    r = simulate("interleaved-1f1b", 2, 4, num_chunks=2)
    # stage 0 warms up 4 chunk-forwards and holds a fifth at the first backward: 5 chunks = 2.5 microbatches
    assert r.peak_inflight[0] == pytest.approx(2.5)


def test_per_stage_costs():
    # a slow last stage sets the pace: 1F1B with p=2, m=4, stage 1 twice as slow
    r = simulate("1f1b", 2, 4, f=[1.0, 2.0], b=[2.0, 4.0])
    assert r.busy == [12.0, 24.0]
    assert r.makespan == pytest.approx(1.0 + 4 * 6.0 + 2.0)
    assert simulate("gpipe", 3, 5, f=[1.0] * 3, b=2.0).makespan == simulate("gpipe", 3, 5).makespan


def test_bad_costs_and_lists_raise():
    with pytest.raises(MpiparError):
        simulate("1f1b", 2, 2, f=-1.0)
    with pytest.raises(MpiparError):
        simulate("1f1b", 2, 2, b=[1.0, 2.0, 3.0])
    with pytest.raises(MpiparError):
        simulate("1f1b", 2, 2, comm=-1.0)
    with pytest.raises(MpiparError):
        simulate("unknown", 2, 2)
    with pytest.raises(MpiparError, match="deadlock"):
        simulate_actions([[Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)],
                          [Action("F", 1), Action("B", 1), Action("F", 0), Action("B", 0)]], 2)


def test_timeline_figure(tmp_path):
    import pandas as pd

    from mpipar.analysis.pipeline_timeline import figure, sim_rows, span_rows

    sim = simulate("zb-h1", 3, 6, f=1.0, b=1.0, w=1.0)
    rows = sim_rows(sim)
    assert [len(r) for r in rows] == [18, 18, 18]
    spans = pd.DataFrame([{"name": "step", "stage": 0, "microbatch": -1, "chunk": 0, "t_start": 1.0, "t_end": 5.0},
                          {"name": "F", "stage": 1, "microbatch": 0, "chunk": 0, "t_start": 2.0, "t_end": 3.0},
                          {"name": "B", "stage": 0, "microbatch": 0, "chunk": 0, "t_start": 3.5, "t_end": 4.0}])
    assert span_rows(spans, 2) == [[("B", 0, 0, 2.5, 3.0)], [("F", 0, 0, 1.0, 2.0)]]
    out = figure(span_rows(spans, 2), rows, "zb-h1", tmp_path / "t.png")
    assert out.exists() and out.stat().st_size > 1000


def test_shared_cores_by_hand():
    """Two stages on one core, GPipe m=2, f=b=1: F1 on stage 0 and F0 on stage 1 share the core
    from t=1 to 3 (half speed each); B0 on stage 0 and B1 on stage 1 likewise from 5 to 7."""
    r = simulate("gpipe", 2, 2, f=1.0, b=1.0, cores=1)
    spans = [[(a.op, a.microbatch, start, end) for a, start, end in row] for row in r.timeline]
    assert spans == [[("F", 0, 0, 1), ("F", 1, 1, 3), ("B", 0, 5, 7), ("B", 1, 7, 8)],
                     [("F", 0, 1, 3), ("F", 1, 3, 4), ("B", 0, 4, 5), ("B", 1, 5, 7)]]
    assert r.makespan == 8 and r.bubble_fraction == pytest.approx(0.25)


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2)])
def test_shared_cores_bounds(name, v):
    """One core does all the work back to back (a deadlock-free list always has a ready action);
    enough cores is the plain simulation; fewer cores are never faster, nor faster than the
    work divided among them."""
    for p in (2, 3, 4):
        for m in range(p if v > 1 else 1, 9, p if v > 1 else 1):
            costs = dict(f=[1.0 + 0.1 * s for s in range(p)], b=2.0, w=0.5 if name == "zb-h1" else 0.0)
            work = m * (sum(costs["f"]) + p * (costs["b"] + costs["w"]))
            assert simulate(name, p, m, v, cores=1, **costs).makespan == pytest.approx(work), (p, m)
            plain = simulate(name, p, m, v, comm=0.3, **costs)
            for cores in (p, p + 2):
                same = simulate(name, p, m, v, comm=0.3, cores=cores, **costs)
                assert (same.makespan, same.timeline) == (plain.makespan, plain.timeline)
            # just short of p cores: the shared-core simulation itself, at full speed to 1e-12
            near = simulate(name, p, m, v, comm=0.3, cores=p * (1 - 1e-12), **costs)
            assert [[(a, pytest.approx(t0), pytest.approx(t1)) for a, t0, t1 in row] for row in near.timeline] \
                == plain.timeline
            for cores in (1, 1.5, p - 1):
                shared = simulate(name, p, m, v, comm=0.3, cores=cores, **costs)
                assert shared.makespan >= max(plain.makespan, work / cores) - 1e-9, (p, m, cores)
                assert 0.0 <= shared.bubble_fraction < 1.0


def test_bad_cores_raise():
    for cores in (0, -1.0):
        with pytest.raises(MpiparError, match="cores"):
            simulate("1f1b", 2, 2, cores=cores)


def test_simulate_point_reads_what_the_row_measured():
    """A row of experiments/pipeline.py: wall costs, the step's hop and no sharing by default; the
    CPU costs and the cores where the stages shared them; files from before take `comm_s`."""
    import json

    from mpipar.analysis.pipeline_timeline import simulate_point

    wall, cpu = {"f": [1.0, 1.2], "b": [2.0, 2.0], "w": [0.0, 0.0]}, {"f": [0.5, 0.6], "b": [1.0, 1.0], "w": [0.0, 0.0]}
    row = {"schedule": "1f1b", "pp": 2, "microbatches": 4, "chunks": 1, "f_s": 1.1, "b_s": 2.0, "w_s": 0.0,
           "costs_per_stage": json.dumps(wall), "comm_s": 0.1}
    assert simulate_point(row).makespan == simulate("1f1b", 2, 4, comm=0.1, **wall).makespan
    row.update(hop_s=0.4, sim_cores=0, cpu_costs_per_stage="")
    assert simulate_point(row).makespan == simulate("1f1b", 2, 4, comm=0.4, **wall).makespan
    row.update(hop_s=float("nan"), sim_cores=1, cpu_costs_per_stage=json.dumps(cpu))
    assert simulate_point(row).makespan == simulate("1f1b", 2, 4, comm=0.1, cores=1, **cpu).makespan


def test_hop_seconds_pairs_each_receive_with_its_send():
    import math

    from mpipar.analysis.pipeline_timeline import hop_seconds

    def span(name, d, i, k, t0, t1):
        return {"name": name, "direction": d, "microbatch": i, "virtual": k, "t_start": t0, "t_end": t1}

    step = [span("send", 0, 0, 1, 1.0, 1.1), span("recv", 0, 0, 1, 0.5, 1.5),   # waited: 0.5
            span("send", 0, 1, 1, 2.0, 2.1), span("recv", 0, 1, 1, 2.5, 2.6),   # came later: not a hop
            span("send", 1, 0, 0, 3.0, 3.1), span("recv", 1, 0, 0, 2.0, 3.2),   # waited: 0.2
            span("recv", 0, 0, 2, 0.0, 9.0)]                                    # its send elsewhere
    assert hop_seconds([step, [span("send", 0, 0, 1, 1.0, 1.1), span("recv", 0, 0, 1, 0.0, 1.4)]]) == \
        pytest.approx(0.4)
    assert math.isnan(hop_seconds([step[2:4]]))  # no receive waited
