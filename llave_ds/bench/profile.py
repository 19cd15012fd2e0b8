"""``--profile``: where one cached step's time goes, from ``torch.profiler``.

One more step of a configuration runs under the profiler after its timed steps; the summary
is the top operators and kernels by self time (device time on CUDA, CPU time on the CPU),
the attention kernels that ran (which SDPA backend, flash-attn or the masked path), and the
time in collectives (ZeRO-3 all-gathers and reduce-scatters, the loss's gathers). It is
what the next round of step-efficiency work starts from (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch

ATTENTION = re.compile(r"flash|fmha|efficient_attention|scaled_dot_product|sdpa|attention", re.I)
COLLECTIVE = re.compile(r"all_?gather|reduce_?scatter|all_?reduce|broadcast|nccl|gloo", re.I)


def _self_time_us(event: Any, on_device: bool) -> float:
    name = "self_device_time_total" if on_device else "self_cpu_time_total"
    value = getattr(event, name, None)
    if value is None and on_device:  # torch releases before the device-time names
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def summarize(events: Iterable[Any], on_device: bool, top: int = 15) -> dict:
    """The profile summary of ``prof.key_averages()``-like events (``key``, ``count`` and
    self times in microseconds): shares are of the summed self time of every event."""
    rows = sorted(((e.key, _self_time_us(e, on_device), int(e.count)) for e in events), key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows) or 1.0

    def entry(name: str, t: float, calls: int) -> dict:
        return {"name": name, "ms": t / 1e3, "share": t / total, "calls": calls}

    attention = [entry(*r) for r in rows if ATTENTION.search(r[0]) and r[1] > 0]
    collectives = [entry(*r) for r in rows if COLLECTIVE.search(r[0]) and r[1] > 0]
    return {"time": "self device time" if on_device else "self CPU time", "total_ms": total / 1e3,
            "top": [entry(*r) for r in rows[:top]], "attention": attention,
            "collectives_ms": sum(c["ms"] for c in collectives), "collectives": collectives}


def profile_step(run_step: Callable[[], Any], device: torch.device, top: int = 15) -> dict:
    """Run ``run_step`` once under ``torch.profiler`` (CPU, plus CUDA on a GPU) and summarize."""
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        run_step()
        if on_device:
            torch.cuda.synchronize(device)
    return summarize(prof.key_averages(), on_device, top)


def format_profile(label: str, summary: dict, top: int = 10) -> list[str]:
    """Report lines: the top entries, the attention kernels, the collectives' share."""
    lines = [f"profile {label} ({summary['time']}, {summary['total_ms']:.1f} ms in all):"]
    for e in summary["top"][:top]:
        lines.append(f"  {e['share'] * 100:5.1f}% {e['ms']:9.2f} ms {e['calls']:6d}x  {e['name'][:90]}")
    kernels = ", ".join(f"{e['name'][:60]} {e['share'] * 100:.1f}%" for e in summary["attention"][:4]) or "none seen"
    lines.append(f"  attention: {kernels}")
    share = summary["collectives_ms"] / summary["total_ms"] * 100 if summary["total_ms"] else 0.0
    lines.append(f"  collectives: {summary['collectives_ms']:.1f} ms ({share:.1f}%)")
    return lines
