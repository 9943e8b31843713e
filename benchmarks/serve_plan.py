"""Which serve_load phases run, and in what order per router: pure functions over its arguments.

A phase key is '<trace>/s<seed>/<kind>' (kind: burst, lo, hi). `plan` lists them seed-major, so a
budget cut loses the last seeds first; `segments` splits them into deploys of one router each.
"""
from __future__ import annotations


def plan(a) -> list[str]:
    """Phase keys 'trace/s<seed>/<kind>', seed-major: a budget cut loses the last seeds first."""
    return [f"{t}/s{s}/{k}" for s in a.seeds.split(",") for t in a.traces.split(",") for k in a.phases.split(",")]


def segments(a, keys: list[str]) -> list[tuple[str, list[str]]]:
    """(router, phase keys) in run order, one deploy each. --order blocks: each router runs all
    its phases in turn. alternate (two routers): which router goes first swaps every seed (seed 0:
    the first of --routers, whose bursts set the open-loop rates), so neither always runs second
    on a warmer cluster (on the dev box the second read 5-15% slower: benchmarks/route_overhead.py)."""
    routers = a.routers.split(",")
    if a.order == "blocks" or len(routers) != 2:
        return [(r, list(keys)) for r in routers]
    out: list[tuple[str, list[str]]] = []
    for j, s in enumerate(a.seeds.split(",")):
        part = [k for k in keys if k.split("/")[1] == f"s{s}"]
        for r in routers if j % 2 == 0 else routers[::-1]:
            if out and out[-1][0] == r:
                out[-1][1].extend(part)
            else:
                out.append((r, list(part)))
    return out
