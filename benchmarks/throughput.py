"""Training throughput of the gradient-cached step at real architecture shapes.

Thin entry point; the implementation (and its documentation) is the ``llave_ds.bench`` package,
also reachable as ``llave-ds bench``. Examples:

    python benchmarks/throughput.py --shape tiny --device cpu --ranks 2 --steps 2
    python benchmarks/throughput.py --shape aquila-vl-2b --pairs-per-rank 64 --chunk-sizes 8 16 32

Prints a table, then one JSON line last. See docs/PERFORMANCE.md for the FLOP formula and
the memory model, benchmarks/RESULTS.md for measurements.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from llave_ds.bench.cli import main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llave_ds.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
