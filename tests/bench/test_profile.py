"""llave_ds.bench.profile: the profile summary (shares, attention kernels, collectives)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from llave_ds.bench.profile import format_profile, summarize


def event(key, us, count=1, device_us=None):
    return SimpleNamespace(key=key, count=count, self_cpu_time_total=us,
                           self_device_time_total=us if device_us is None else device_us)


def test_summary_by_hand():
    events = [event("aten::mm", 600.0, 40), event("aten::_scaled_dot_product_flash_attention_for_cpu", 250.0, 8),
              event("c10d::allgather_", 100.0, 12), event("aten::add", 50.0, 90), event("idle", 0.0)]
    s = summarize(events, on_device=False, top=3)
    assert s["time"] == "self CPU time" and s["total_ms"] == pytest.approx(1.0)
    assert [e["name"] for e in s["top"]] == ["aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                             "c10d::allgather_"]
    assert s["top"][0] == {"name": "aten::mm", "ms": 0.6, "share": pytest.approx(0.6), "calls": 40}
    assert [e["name"] for e in s["attention"]] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert s["collectives_ms"] == pytest.approx(0.1) and s["collectives"][0]["calls"] == 12
    # on a GPU the device times count: here the kernel, not its CPU launch
    d = summarize([event("launch", 900.0, device_us=0.0), event("ncclDevKernel_AllGather", 5.0, device_us=300.0),
                   event("flash_fwd_kernel", 1.0, device_us=700.0)], on_device=True)
    assert d["time"] == "self device time" and [e["name"] for e in d["top"][:2]] == ["flash_fwd_kernel",
                                                                                      "ncclDevKernel_AllGather"]
    assert d["collectives_ms"] == pytest.approx(0.3) and d["attention"][0]["share"] == pytest.approx(0.7)
    lines = format_profile("zero3 chunk=16", d)
    assert lines[0].startswith("profile zero3 chunk=16 (self device time, 1.0 ms in all)")
    assert "flash_fwd_kernel 70.0%" in lines[-2] and lines[-1] == "  collectives: 0.3 ms (30.0%)"
