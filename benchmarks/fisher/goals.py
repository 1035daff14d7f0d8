"""The issue's goals, checked against a workload's measured ratios: each ``Goal`` of its config
(configs.py) becomes a verdict (MET / NOT MET / not measured), with the N the goal is stated for."""
from __future__ import annotations

import operator
from typing import Any

from .configs import Goal

OPS = {"<=": operator.le, ">=": operator.ge}


def derived_ratios(w: dict[str, Any], memory_rows: list[dict[str, Any]]) -> dict[str, float]:
    """Ratios that are not one time over another: the self-check's share of a pass, and the peak
    memory of fishkern over the floor's (CPU: peak RSS growth in the memory processes; CUDA: peak
    allocated growth)."""
    out: dict[str, float] = {}
    r = w.get("ratios", {})
    if "fishkern/fishkern-nocheck" in r:
        out["self-check overhead"] = r["fishkern/fishkern-nocheck"] - 1.0
        out["self-check overhead (min)"] = r["fishkern/fishkern-nocheck (min)"] - 1.0

    def peak(method: str):
        cpu = [m for m in memory_rows if m.get("workload") == w["workload"] and m.get("method") == method]
        if cpu:
            return cpu[0].get("peak_growth_bytes")
        return ((w["methods"].get(method) or {}).get("memory") or {}).get("peak_allocated_growth_bytes")

    fk, floor = peak("fishkern"), peak("floor")
    if fk and floor:
        out["memory fishkern/floor"] = fk / floor
    return out


def evaluate(goals: tuple[Goal, ...], ratios: dict[str, float], n: int) -> list[dict[str, Any]]:
    """One verdict per goal: the measured value (median-based; min-based where there is one), MET /
    NOT MET / 'not measured', and notes: when this run's N is not the goal's, and, for a goal against
    the loop, the ceiling on this machine (loop/floor: no Fisher pass is cheaper than the plain
    forward+backward, so loop/fishkern cannot exceed it; below the goal's threshold, the goal cannot
    be met on this machine by any implementation)."""
    out = []
    for g in goals:
        value = ratios.get(g.ratio)
        verdict = "not measured" if value is None else ("MET" if OPS[g.op](value, g.threshold) else "NOT MET")
        notes = []
        if g.at_n and g.at_n != n:
            notes.append(f"this run has N={n}, the goal is stated for N={g.at_n}")
        ceiling = loop_ceiling(g, ratios)
        if ceiling is not None:
            reach = "out of reach on this machine" if ceiling < g.threshold else "within reach"
            notes.append(f"ceiling loop/floor = {ceiling:.2f}×: {reach}")
        out.append({"label": g.label or f"{g.ratio} {g.op} {g.threshold:g}", "ratio": g.ratio, "op": g.op,
                    "threshold": g.threshold, "value": value, "value_min": ratios.get(g.ratio + " (min)"),
                    "verdict": verdict, "ceiling": ceiling, "note": "; ".join(notes)})
    return out


def loop_ceiling(g: Goal, ratios: dict[str, float]) -> float | None:
    """loop/floor for a goal on loop/fishkern (None for other goals, or when either was not timed)."""
    if not g.ratio.startswith("loop/fishkern"):
        return None
    return ratios.get("loop/floor")
