"""What the benchmark measures with: synchronised phase marks around a step backend, the
uncached reference step, the device's matmul peak and a per-rank peak-memory probe."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from llave_ds.core.gather import is_distributed
from llave_ds.core.objective import hardness_weighted_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedBackend:
    """A StepBackend wrapper that marks phase boundaries with a device synchronisation.

    gradcache_step's own timings read the host clock without synchronising, so on a GPU
    they measure kernel launches; here each boundary waits for the device: end of the
    no-grad pass (after the expected number of no-grad encodes), start of pass 2 (first
    encode with autograd), end of the last backward, start and end of ``step()``.
    """

    def __init__(self, inner, no_grad_encodes: int = 0):
        self.inner = inner
        self.device = inner.device
        self.gradient_average_divisor = inner.gradient_average_divisor
        self.no_grad_encodes = no_grad_encodes
        self.marks: dict[str, float] = {}
        self._n_no_grad = 0

    @property
    def reduction(self) -> str:
        return getattr(self.inner, "reduction", "coalesced")

    def mark(self, name: str) -> None:
        sync(self.device)
        self.marks[name] = time.perf_counter()

    def begin(self) -> None:
        self.marks = {}
        self._n_no_grad = 0
        self.mark("start")

    def encode(self, chunk):
        grad = torch.is_grad_enabled()
        if grad and "pass2_start" not in self.marks:
            self.mark("pass2_start")
        elif not grad and self._n_no_grad == 0:
            self.mark("pass1_start")
        out = self.inner.encode(chunk)
        if not grad:
            self._n_no_grad += 1
            if self._n_no_grad == self.no_grad_encodes:
                self.mark("pass1_end")
        return out

    def backward(self, surrogate, last: bool) -> None:
        self.inner.backward(surrogate, last)
        if last:
            self.mark("backward_end")

    def reduction_context(self, mode: str):
        return self.inner.reduction_context(mode)

    def step(self) -> dict:
        self.mark("step_start")
        info = self.inner.step()
        self.mark("step_end")
        return info

    def cached_phases(self, end: float) -> dict[str, float]:
        """Phase durations of the last cached step. A step that gradcache_step skipped (a
        non-finite loss: no pass 2) has only encode and loss; the rest counts as 'rest'."""
        m = self.marks
        order = [("encode", "pass1_start", "pass1_end"), ("loss", "pass1_end", "pass2_start"),
                 ("reencode_backward", "pass2_start", "backward_end"),
                 ("reduce", "backward_end", "step_start"), ("step", "step_start", "step_end")]
        phases = {name: (m[b] - m[a]) if (a in m and b in m) else 0.0 for name, a, b in order}
        phases["rest"] = (end - m["start"]) - sum(phases.values())
        return phases


def plain_step(backend: TimedBackend, query: dict, target: dict, objective) -> dict[str, float]:
    """The uncached step: both roles forward with autograd over the whole local batch, the
    loss (with the same cross-rank gather), one backward, one optimizer step."""
    backend.begin()
    q = backend.encode(query).float()
    t = backend.encode(target).float()
    backend.mark("forward_end")
    out = hardness_weighted_loss(
        q, t, temperature=objective.temperature, alpha=objective.alpha, symmetric=objective.symmetric,
        gather_mode=objective.gather_mode if is_distributed() else None)
    backend.mark("loss_end")
    with backend.reduction_context(backend.reduction):
        backend.backward(out.loss * float(backend.gradient_average_divisor), last=True)
    backend.step()
    end = time.perf_counter()
    m = backend.marks
    return {"forward": m["forward_end"] - m["start"], "loss": m["loss_end"] - m["forward_end"],
            "backward": m["backward_end"] - m["loss_end"], "reduce": m["step_start"] - m["backward_end"],
            "step": m["step_end"] - m["step_start"], "total": end - m["start"]}


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, trials: int = 5) -> float:
    """Matmul rate on this device, random operands: 8192^3 (CUDA, 10 products per trial) or
    1024^3 (CPU, 5 per trial), after 3 warm-ups; the best of ``trials`` trials (a shared
    CPU is slowed by other jobs at moments; the best trial is the least disturbed one)."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    del a, b
    return 2.0 * n ** 3 / best / 1e12


def _read_status_kib(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of this rank over a window: CUDA allocator peak, or on CPU the process's
    peak RSS (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_rss = (_read_status_kib("VmRSS") or 0) * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"peak_allocated": float(torch.cuda.max_memory_allocated(self.device)),
                    "peak_reserved": float(torch.cuda.max_memory_reserved(self.device)),
                    "kind": "cuda_max_memory_allocated"}
        hwm = (_read_status_kib("VmHWM") or 0) * 1024
        return {"peak_allocated": float(hwm - self.baseline_rss), "peak_rss": float(hwm),
                "kind": "host_rss_minus_baseline"}
