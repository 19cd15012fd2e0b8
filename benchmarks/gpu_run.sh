#!/usr/bin/env bash
# The prepared GPU benchmark run: one H100 or H200, at most 7 minutes of command time.
#
#   1. installs the carried wheels (benchmarks/wheels/, made by prepare_gpu_wheels.sh on a
#      CPU machine) with pip --no-index --no-deps into /tmp/site;
#   2. runs llave_ds.bench on the Aquila-VL-2B and LLaVA-OV 0.5B shapes at real lengths
#      (384x384 images = 1485 image tokens + 40-120 text tokens per query; 10-60-token
#      text targets), bf16, gradient cache on, chunk 16, 64 pairs, most important first:
#      (a) ZeRO-3 vs ZeRO-2 with the step optimizations on, with the uncached step (ZeRO-3 also
#          profiled: one more step under torch.profiler, top kernels / attention / collectives);
#      (f) 2B ZeRO-3 with the padding mask passed again (--padding-mask always; issue 25 lever 1);
#      (g) 2B ZeRO-3 with token-budget chunks (--chunk-tokens; issue 25 lever 5);
#      (i) 2B ZeRO-3 with the memory plan (--ckpt auto --persistence-threshold auto; levers 2, 3),
#          and (j) with persistence auto alone;
#      (h) 2B ZeRO-3 with Liger-Kernel's fused RMSNorm / RoPE / SwiGLU (--fused-kernels liger;
#          issue 25 lever 4; the liger-kernel wheel is carried, triton comes with the image's torch);
#      (d) the peer: sentence-transformers' CachedMultipleNegativesRankingLoss against
#          llave-ds's cached step on the same Qwen2-0.5B-shaped text encoder
#          (benchmarks/peer_cached_mnrl.py; the GPU image ships sentence-transformers);
#      (e) Qwen3-VL-2B (configs/qwen3vl_2b.yaml): the cached ZeRO-3 step at the configs'
#          chunk size (32 = the whole 32-pair local batch of 256 pairs on 8 GPUs), 1280-token
#          query images (1024x1280 px), to set the memory model's prediction against a measurement;
#      (b) ZeRO-3 with the optimizations off; (c) 0.5B; then one lever off at a time;
#   3. leaves in $OUT: gpu_run.log (everything), results.jsonl (one JSON line per run), env.txt.
#
# Device tool:  command "bash benchmarks/gpu_run.sh", carry ["benchmarks/wheels"], timeout_s 600
# Dry run here: DRY_RUN=1 bash benchmarks/gpu_run.sh   (the same python command lines with
#               --device cpu --shape tiny and small batches appended; no install)
# Only some:    ONLY="2b_z3_novc peer_st_05b" bash benchmarks/gpu_run.sh
#               (the Qwen3-VL-2B run alone: ONLY=q3_2b_z3; its dry run uses the qwen3-tiny shape)
#
# BUDGET_S (default 400, so the whole command fits 7 minutes with the install): no run starts
# after this many seconds, and each run is killed (timeout) when the budget is spent, so
# whatever finished is in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/llave_gpu_run}
mkdir -p "$OUT"
LOG=$OUT/gpu_run.log
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
DRY=${DRY_RUN:-0}
BUDGET=${BUDGET_S:-400}
ONLY=${ONLY:-}  # a space-separated list of run names: run only those (a rerun of what a budget cut off)
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
say() { echo "[gpu_run $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# ---- 1. environment ------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    export DS_ACCELERATOR=cpu
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    say "DRY RUN: no install; checking the carried wheels are there and built for CPython 3.12"
    ls benchmarks/wheels/*.whl >>"$LOG" 2>&1 || { say "no wheels: run benchmarks/prepare_gpu_wheels.sh"; exit 1; }
    for w in benchmarks/wheels/*.whl; do
        case "$w" in *-py3-none-any.whl|*-cp312-*) ;; *) say "wheel not for cp312/any: $w"; exit 1 ;; esac
    done
else
    PY=${PYTHON:-python3}
    export DS_ACCELERATOR=cuda
    say "installing carried wheels into /tmp/site"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site benchmarks/wheels/*.whl >>"$LOG" 2>&1; then
        say "pip install of the carried wheels failed (see log)"; exit 1
    fi
    export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ! "$PY" -c "import transformers, transformers.models.llava_onevision" >>"$LOG" 2>&1; then
        say "carried transformers does not import here: falling back to the image's own"
        rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
    fi
    if ! "$PY" -c "import deepspeed, transformers, llave_ds.bench.runner" >>"$LOG" 2>&1; then
        say "deepspeed / transformers / llave_ds do not import (see log)"; exit 1
    fi
fi
{
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, transformers, deepspeed; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('transformers', transformers.__version__, transformers.__file__); print('deepspeed', deepspeed.__version__, deepspeed.__file__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

# ---- 2. the runs ----------------------------------------------------------------------
COMMON=(--device cuda --dtype bfloat16 --image-size 384x384 --query-text-tokens 40-120
        --target-text-tokens 10-60 --query-image-fraction 1.0 --target-image-fraction 0.0
        --warmup 1 --steps 2 --uncached-steps 2)
DRY_OVERRIDES=(--device cpu --dtype float32 --shape tiny --image-size 28x28 --pairs-per-rank 4
               --chunk-sizes 2 --query-text-tokens 10-30 --target-text-tokens 5-15 --warmup 1
               --steps 1 --uncached-steps 1 --peak-tflops 0.05
               --fused-kernels auto)  # Liger is GPU only: auto (= off on CPU) keeps a liger run's dry run green
FAILED=0

selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

bench() {  # bench NAME ARGS...: one benchmark invocation, its JSON line appended to results.jsonl
    local name=$1; shift
    selected "$name" || return 0
    local now left
    now=$(date +%s); left=$(( BUDGET - (now - START) ))
    if [ "$left" -lt 45 ]; then say "SKIP $name: ${left}s of budget left"; return 0; fi
    local args=("${COMMON[@]}" "$@" --label "$name" --json-out "$OUT/$name.json")
    [ "$DRY" = 1 ] && args+=("${DRY_OVERRIDES[@]}")
    # a run of another architecture names its dry-run shape: DRY_SHAPE=qwen3-tiny DRY_IMAGE=64x64 bench ...
    [ "$DRY" = 1 ] && [ -n "${DRY_SHAPE:-}" ] && args+=(--shape "$DRY_SHAPE" --image-size "${DRY_IMAGE:-64x64}")
    say "RUN $name (limit ${left}s): $PY -m llave_ds.bench ${args[*]}"
    timeout --signal=TERM --kill-after=10 "$left" "$PY" -m llave_ds.bench "${args[@]}" >>"$LOG" 2>&1
    local rc=$?
    if [ -s "$OUT/$name.json" ]; then
        cat "$OUT/$name.json" >> "$RESULTS"
        rm -f "$OUT/$name.json"   # at most 8 files come back from $OUT: keep them in results.jsonl
        say "DONE $name (rc $rc)"
    else
        say "FAILED $name (rc $rc; no result)"; FAILED=$((FAILED + 1))
    fi
}

peer() {  # peer NAME ARGS...: benchmarks/peer_cached_mnrl.py, its JSON line appended to results.jsonl
    local name=$1; shift
    selected "$name" || return 0
    local now left
    now=$(date +%s); left=$(( BUDGET - (now - START) ))
    if [ "$left" -lt 45 ]; then say "SKIP $name: ${left}s of budget left"; return 0; fi
    local args=("$@" --json-out "$OUT/$name.json")
    [ "$DRY" = 1 ] && args+=(--device cpu --layers 2 --pairs 8 --mini-batch 4 --query-tokens 10-30 --target-tokens 5-15 --steps 1)
    say "RUN $name (limit ${left}s): $PY benchmarks/peer_cached_mnrl.py ${args[*]}"
    timeout --signal=TERM --kill-after=10 "$left" "$PY" benchmarks/peer_cached_mnrl.py "${args[@]}" >>"$LOG" 2>&1
    local rc=$?
    if [ -s "$OUT/$name.json" ]; then
        cat "$OUT/$name.json" >> "$RESULTS"; rm -f "$OUT/$name.json"; say "DONE $name (rc $rc)"
    else
        say "FAILED $name (rc $rc; no result)"; FAILED=$((FAILED + 1))
    fi
}

# Most important first: the budget may end the list early. Every run is its own process
# (ZeRO-3 used to patch F.linear process-wide). "opt" = the defaults: ZeRO-3 fetch units,
# memory_efficient_linear false, frozen-vision cache, no redundant padding mask; "base" = all
# four off (the old step).
# (a) 2B, chunk 16, optimizations on: ZeRO-3 vs ZeRO-2, each with the uncached step.
bench 2b_z3_opt  --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --profile
bench 2b_z2_opt  --shape aquila-vl-2b --pairs-per-rank 64 --stages 2 --ckpt non_reentrant --chunk-sizes 16
# (i) levers 2 and 3: the memory plan under 0.9 x the card's memory (predicted on an H200: checkpointing
#     off, 97.5 GiB, 1289 TF per step instead of 1588; every parameter whole: no ZeRO-3 gathers per pass).
bench 2b_z3_auto --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt auto --chunk-sizes 16 \
      --persistence-threshold auto --uncached-steps 0
# (f) issue 25's first lever off: the padding mask passed to the LM again (2b_z3_opt drops it, right padding).
bench 2b_z3_mask --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --uncached-steps 0 --padding-mask always
# (g) lever 5: token-budget chunks, up to 64 rows and 24,000 padded tokens (predicted 32.5 GiB against
#     32.9 for chunk 16; 6 chunks per step instead of 8: the 64 text targets in one).
bench 2b_z3_tok  --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 64 \
      --chunk-tokens 24000 --uncached-steps 0
# (h) lever 4: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU on the LM (2b_z3_opt's settings otherwise).
bench 2b_z3_liger --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --uncached-steps 0 --fused-kernels liger
# (j) lever 3 alone: checkpointing as in 2b_z3_opt, the headroom spent on whole parameters.
bench 2b_z3_persist --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --persistence-threshold auto --uncached-steps 0
# (d) the peer: sentence-transformers' CachedMNRL vs llave-ds's cached step, same Qwen2-0.5B-shaped text encoder.
peer  peer_st_05b --pairs 64 --mini-batch 16
# (e) Qwen3-VL-2B, cached ZeRO-3 at configs/qwen3vl_2b.yaml's chunk size (32), 1280-token query images, text targets.
DRY_SHAPE=qwen3-tiny DRY_IMAGE=64x64 \
bench q3_2b_z3   --shape qwen3-vl-2b --pairs-per-rank 32 --stages 3 --ckpt non_reentrant --chunk-sizes 32 \
      --image-size 1024x1280
# (b) 2B ZeRO-3 chunk 16 with the optimizations off (before/after on the same machine).
bench 2b_z3_base --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --uncached-steps 0 --no-fetch-units --deepspeed-linear --no-vision-cache --padding-mask always
# (c) 0.5B ZeRO-3, optimizations on.
bench 05b_z3_opt --shape llava-ov-0.5b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 32
# one lever at a time, 2B ZeRO-3 chunk 16: without the vision cache; without fetch units.
bench 2b_z3_novc --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --uncached-steps 0 --no-vision-cache
bench 2b_z3_nofu --shape aquila-vl-2b --pairs-per-rank 64 --stages 3 --ckpt non_reentrant --chunk-sizes 16 \
      --uncached-steps 0 --no-fetch-units

# ---- 3. summary -----------------------------------------------------------------------
say "finished: $(wc -l < "$RESULTS") result line(s) in $RESULTS, $FAILED failed"
"$PY" - "$RESULTS" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("benchmark") == "peer_cached_mnrl":
        for name, row in r["rows"].items():
            print(f"{'peer':>18} {name:<34} step {row['step_s']:.3f}s  {row['pairs_per_s']:.1f} pairs/s  first loss {row['first_loss']:.5f}")
        print(f"{'peer':>18} llave-ds / sentence-transformers = {r['llave_over_st']:.3f}")
        continue
    for row in r["rows"]:
        if "step_s" not in row:
            print(f"{r['label']:>18} zero{row['stage']} ckpt={row['ckpt']:<13} chunk={row['chunk']:<3} skipped: {row.get('skipped')}")
            continue
        print(f"{r['label']:>18} zero{row['stage']} ckpt={row['ckpt']:<13} chunk={row['chunk']:<3} "
              f"step {row['step_s']:.3f}s  {row['samples_per_s']:.1f} samp/s  MFU {100*row['mfu']:.1f}%  "
              f"HFU {100*row['hfu']:.1f}%  mem {row['peak_memory_gib']:.1f}/{row['predicted_memory_gib']:.1f} GiB  "
              f"bk {100*row['bookkeeping_frac']:.2f}%  c/u {row.get('cached_over_uncached', float('nan')):.2f}  "
              f"fetches/step {sum((row.get('zero3_fetches_per_step') or {}).values()):.0f}")
        if row.get("profile"):  # --profile: where that step's time went
            from llave_ds.bench.profile import format_profile
            print("\n".join(format_profile(f"{r['label']} chunk={row['chunk']}", row["profile"])))
PYEOF
[ "$FAILED" = 0 ]
