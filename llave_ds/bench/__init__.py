"""Training throughput of the gradient-cached step at real architecture shapes.

    llave-ds bench --shape aquila-vl-2b --pairs-per-rank 64 --chunk-sizes 8 16 32
    python -m llave_ds.bench --shape tiny --device cpu --ranks 2 --steps 2
    llave-ds bench --predict-only --shape qwen3-vl-2b --ranks 8 --pairs-per-rank 32 --image-size 1024x1280

Builds an embedding model of a real shape with random weights, synthesises the tensors
the processor would produce for MMEB-like pairs, wraps it in a DeepSpeed engine and times
``gradcache_step``: warm-up steps, then ``--steps`` timed steps per configuration (every
ZeRO stage of ``--stages`` x checkpointing mode of ``--ckpt`` x chunk size of
``--chunk-sizes``), and the uncached step at the same local batch where it fits.

Reported per configuration: samples/s and tokens/s (total and per rank), model FLOPs
per step, MFU and HFU against ``--peak-tflops`` or a measured matmul peak, peak memory per
rank against the memory model, the time split (no-grad encode, loss + gather, re-encode +
backward, gradient reduction, optimizer step, rest) and the cached/uncached ratio. The FLOP
formula and the memory model are written out in docs/PERFORMANCE.md. Output: a table, then
one JSON line last (also written to ``--json-out``).

One concept per module (tests mirror them in tests/bench/):

* ``shapes``  the real architecture shapes as transformers configs;
* ``inputs``  synthetic inputs: image geometry, sides, chunks, a rank's workload;
* ``timing``  synchronised phase marks, the uncached step, matmul peak, memory probe;
* ``runner``  one rank's run: build model + engine per configuration, time the steps;
* ``predict`` ``--predict-only``: the cost model for a run, without a model;
* ``report``  progress lines, the table, the JSON line, the targets;
* ``cli``     the arguments, ``--ranks`` re-launch under torchrun, ``main``.

The cost model it reads (parameter counts, FLOPs, memory, MFU) is the library's,
``llave_ds.training.cost`` and ``cost_qwen3vl``, which training's memory plan reads too.

It is a sub-package of the library rather than a script under benchmarks/ because the
``llave-ds bench`` console command must work from an installed wheel (docs/DECISIONS.md).
"""
