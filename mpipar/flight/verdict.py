"""The verdict: the ranks' flight records lined up per group, and what went wrong.

For every group (name and member world ranks) the collective calls of its
members line up by sequence number (mpipar.flight.recorder). The verdict names
- a mismatch: the first call number at which members ran different ops, or
  the same op on different dtypes or shapes;
- a hang: the call some members wait in (who waited, and for how long), the
  members that never arrived at it, and for each of those what it did last
  (its latest recorded call, finished or itself waiting elsewhere); a member
  without a record file is named as such;
- a point-to-point wait: who waits for which peer, and what that peer did last;
- a rank whose record says an unhandled exception ended it (first, when there is one);
- else that the records agree.
Findings are ordered by when the wait began, so the first is the first divergence.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re


@dataclasses.dataclass
class Finding:
    kind: str                  # "mismatch" | "hang" | "p2p"
    group: str                 # "world [0, 1, 2]"
    seq: int
    op: str
    waiting: list = dataclasses.field(default_factory=list)   # world ranks that wait in the call
    missing: list = dataclasses.field(default_factory=list)   # members that never arrived
    lines: list = dataclasses.field(default_factory=list)
    since: float = 0.0         # wall time the wait began (ordering)


@dataclasses.dataclass
class Verdict:
    findings: list
    lines: list
    ranks: list                # world ranks with a record
    absent: list               # world ranks without one
    failed: list = dataclasses.field(default_factory=list)  # ranks whose record says an exception ended them

    @property
    def agree(self) -> bool:
        return not self.findings and not self.failed

    def __str__(self) -> str:
        return "\n".join(self.lines)


def load(directory: str) -> dict:
    """{world rank: record} of the rank<R>.json files in `directory`."""
    records = {}
    for path in glob.glob(os.path.join(directory, "rank*.json")):
        m = re.fullmatch(r"rank(\d+)\.json", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            records[int(m.group(1))] = json.load(f)
    return records


def _group_label(call) -> str:
    return f"{call.get('group')} {call.get('ranks')}"


def _describe(call, rec=None) -> str:
    """'all_reduce #4 on group world [0, 1] (float32 [1024], 4096 B), finished (...)' and the like."""
    where = f"{call['op']} #{call['seq']} on group {_group_label(call)}"
    if call.get("peer") is not None:
        where += f" with rank {call['peer']}"
    what = []
    if call.get("dtype") is not None:
        what.append(f"{call['dtype']} {call.get('shape')}")
    if call.get("bytes") is not None:
        what.append(f"{call['bytes']} B")
    if what:
        where += f" ({', '.join(what)})"
    if not call.get("done"):
        return where + f", still waiting ({call.get('waited', 0):.1f} s)"
    if call.get("end") is not None and call.get("start") is not None:
        ago = f", {rec['time'] - call['end']:.1f} s before its record was written" if rec and rec.get("time") else ""
        return where + f", finished (took {(call['end'] - call['start']) * 1e3:.3f} ms{ago})"
    if rec is not None and rec.get("time") and call.get("start") is not None:
        return where + f", finished (began {rec['time'] - call['start']:.1f} s before its record was written)"
    return where + ", finished"


def _last_call(rec):
    calls = rec.get("calls") or []
    return calls[-1] if calls else None


def analyse(records: dict) -> Verdict:
    """The verdict on {world rank: record}."""
    lines = []
    jobs = collections.Counter(r.get("job") for r in records.values())
    if len(jobs) > 1:
        job = jobs.most_common(1)[0][0]
        stale = sorted(k for k, r in records.items() if r.get("job") != job)
        lines.append(f"note: ignoring the records of ranks {stale}: they come from another job")
        records = {k: r for k, r in records.items() if r.get("job") == job}
    size = max([r.get("world_size", 0) for r in records.values()] + [max(records, default=-1) + 1])
    absent = [r for r in range(size) if r not in records]
    head = f"mpipar flight verdict: records of ranks {sorted(records)} of {size}"
    if absent:
        head += f" (no record from ranks {absent})"
    lines.insert(0, head)
    for k in sorted(records):
        rec = records[k]
        if rec.get("reason") in ("exception", "watchdog") and rec.get("message"):
            lines.append(f"rank {k} ({rec['reason']}): {rec['message']}")

    # collectives of each group, by member and sequence number
    groups: dict = {}
    for k, rec in records.items():
        for call in rec.get("calls") or []:
            if call.get("kind") != "collective" or not call.get("ranks"):
                continue
            key = (call.get("group"), tuple(call["ranks"]))
            groups.setdefault(key, {}).setdefault(k, {})[call["seq"]] = call

    findings = []
    for (name, members), by_rank in groups.items():
        label = f"{name} {list(members)}"
        f = _mismatch(label, by_rank)
        if f is not None:
            findings.append(f)
            continue
        f = _hang(label, members, by_rank, records)
        if f is not None:
            findings.append(f)
    findings += _p2p(records)
    findings += _unknown_group(records)
    findings.sort(key=lambda f: (f.since, f.group))

    failed = [k for k in sorted(records) if records[k].get("reason") == "exception"]
    if not findings and failed:
        lines.append(f"verdict: rank {failed[0]} failed ({records[failed[0]].get('message')})")
    elif not findings:
        lines.append("verdict: the ranks agree (no call where a group's ranks diverge, nobody waiting)")
        for (name, members), by_rank in sorted(groups.items(), key=lambda kv: str(kv[0])):
            last = {k: max(v) for k, v in by_rank.items()}
            lines.append(f"  group {name} {list(members)}: last call #{max(last.values())}")
    else:
        first = findings[0]
        if failed:  # an exception ended the job: the waits are its consequence
            lines.append(f"verdict: rank {failed[0]} failed ({records[failed[0]].get('message')}); "
                         f"then {first.lines[0]}")
        else:
            lines.append(f"verdict: {first.lines[0]}")
        for f in findings:
            lines.append("")
            lines.extend(f.lines)
    return Verdict(findings, lines, sorted(records), absent, failed)


def _mismatch(label, by_rank):
    seqs = sorted(set().union(*[set(v) for v in by_rank.values()]))
    for s in seqs:
        calls = {k: v[s] for k, v in by_rank.items() if s in v}
        if len(calls) < 2:
            continue
        ops = {c["op"] for c in calls.values()}
        if len(ops) > 1:
            what, detail = "mismatched op", ", ".join(f"rank {k}: {c['op']}" for k, c in sorted(calls.items()))
        elif len({(c.get("dtype"), tuple(c.get("shape") or ())) for c in calls.values()}) > 1:
            what = "different dtypes" if len({c.get("dtype") for c in calls.values()}) > 1 else "different shapes"
            detail = ", ".join(f"rank {k}: {c.get('dtype')} {c.get('shape')}" for k, c in sorted(calls.items()))
        else:
            continue
        op = "/".join(sorted(ops))
        since = min(c["start"] for c in calls.values())
        return Finding("mismatch", label, s, op, lines=[
            f"{what} at call #{s} on group {label}: {detail}"], since=since)
    return None


def _hang(label, members, by_rank, records):
    waiting = {k: c for k, v in by_rank.items() for c in v.values() if not c.get("done")}
    if not waiting:
        return None
    s = min(c["seq"] for c in waiting.values())
    op = next(c["op"] for c in waiting.values() if c["seq"] == s)
    at = {k: c for k, c in waiting.items() if c["seq"] == s}
    longest = max(c.get("waited", 0.0) for c in at.values())
    lines = [f"{op} #{s} on group {label}: ranks {sorted(at)} waited (up to {longest:.1f} s); "]
    missing, notes = [], []
    for m in members:
        if m in at:
            continue
        if m not in records:
            missing.append(m)
            notes.append(f"  rank {m} never arrived; it left no record (killed, on another node, or stuck "
                         f"outside Python)")
            continue
        mine = by_rank.get(m, {})
        if mine and max(mine) >= s:
            continue  # it got there (and maybe further: waiting elsewhere is its own finding)
        missing.append(m)
        last_here = f"#{max(mine)}" if mine else "none in its record"
        last = _last_call(records[m])
        did = _describe(last, records[m]) if last else "no call recorded"
        notes.append(f"  rank {m} never arrived (its last call on this group: {last_here}); "
                     f"its last call: {did}")
    if missing:
        lines[0] += f"ranks {missing} never arrived"
    else:
        lines[0] += "every member arrived (the wait is inside the call)"
    since = min(c["start"] for c in at.values())
    return Finding("hang", label, s, op, sorted(at), missing, lines + notes, since)


def _others(k, records, peers=None):
    """Lines on what the other ranks were doing, and those in no call."""
    lines, idle = [], []
    for p in sorted(records) if peers is None else peers:
        if p == k:
            continue
        if p not in records:
            idle.append(p)
            lines.append(f"  rank {p} left no record")
            continue
        last = _last_call(records[p])
        if last is not None and not last.get("done"):
            lines.append(f"  rank {p} itself waits: {_describe(last, records[p])}")
        else:
            idle.append(p)
            lines.append(f"  rank {p} is in no mpipar call; its last call: "
                         f"{_describe(last, records[p]) if last else 'none recorded'}")
    return lines, idle


def _unknown_group(records):
    """Waits whose group the recorder did not know (a bare wait on MPI requests)."""
    out = []
    for k, rec in sorted(records.items()):
        for call in rec.get("calls") or []:
            if call.get("kind") != "collective" or call.get("ranks") or call.get("done"):
                continue
            lines, idle = _others(k, records, list(range(rec.get("world_size", 0))))
            head = f"rank {k} waited {call.get('waited', 0.0):.1f} s in {call['op']} #{call['seq']} (group not known)"
            out.append(Finding("wait", "unknown", call["seq"], call["op"], [k], idle, [head] + lines, call["start"]))
    return out


def _p2p(records):
    out = []
    for k, rec in sorted(records.items()):
        for call in rec.get("calls") or []:
            if call.get("kind") != "p2p" or call.get("done"):
                continue
            peer = call.get("peer")
            label = _group_label(call)
            head = (f"rank {k} waited {call.get('waited', 0.0):.1f} s in {call['op']} #{call['seq']} on group {label}"
                    + (f" for rank {peer}" if peer is not None else " (several peers)"))
            peers = [peer] if peer is not None else [r for r in call.get("ranks", []) if r != k]
            more, missing = _others(k, records, peers)
            lines = [head] + more
            out.append(Finding("p2p", label, call["seq"], call["op"], [k], missing, lines, call["start"]))
    return out
