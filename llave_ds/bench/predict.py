"""``--predict-only``: the analytic side of the benchmark, with no model, no process group
and no device."""
from __future__ import annotations

from llave_ds.bench import shapes
from llave_ds.bench.inputs import build_workload, chunked, describe
from llave_ds.bench.runner import ds_config_for, padding_mask_kept
from llave_ds.training.cost import (GIB, checkpointed_share, chunk_forward_flops, predict_chunks_memory, step_flops,
                                    sum_parts)
from llave_ds.training.memory_plan import MemoryConfig, plan_memory, worst_chunk


def predict_only(args) -> dict:
    """Per configuration of ``args``: the FLOPs of a cached and an uncached step, their
    ratio, the MFU ceiling (model / hardware FLOPs) and the memory model, for a world of
    ``--ranks``. Persistent ZeRO-3 parameters are not known without a model and counted as
    partitioned."""
    w = build_workload(args)
    hf_config, counts, geo, sides_q, sides_t = w.config, w.counts, w.geo, w.sides_q, w.sides_t
    world = args.ranks
    dtype_name = args.dtype if args.dtype != "auto" else "bfloat16"
    pbytes = 2 if dtype_name == "bfloat16" else 4
    rows = []
    for stage in args.stages:
        for ckpt in args.ckpt:
            ds_cfg = ds_config_for(args, stage, args.pairs_per_rank, world, ckpt, pbytes == 2)
            every = args.checkpoint_every
            if ckpt == "auto":  # the plan for the largest chunk (no model: no persistence planned)
                budget = MemoryConfig(budget_gib=args.memory_budget_gib).budget_bytes(None)
                chunk = worst_chunk(hf_config, chunk_rows=max(args.chunk_sizes), step_rows=2 * args.pairs_per_rank,
                                    max_length=max(s.length(geo) for s in sides_q + sides_t),
                                    chunk_tokens=args.chunk_tokens)
                plan = plan_memory(hf_config, counts, [], chunk, budget_bytes=budget, stage=stage, world=world,
                                   param_bytes=pbytes, reduction=args.reduction, ds_config=ds_cfg,
                                   padding_mask=padding_mask_kept(args), checkpointing="auto")
                ckpt, every = plan.checkpointing, plan.checkpoint_every
            checkpointing = 0.0 if ckpt == "off" else checkpointed_share(hf_config, every)
            fwd_u = sum_parts([chunk_forward_flops(hf_config, sides_q, geo),
                               chunk_forward_flops(hf_config, sides_t, geo)])
            unc = step_flops(fwd_u, cached=False, checkpointing=checkpointing,
                             vision_trained=args.train_vision_tower)
            settings = dict(stage=stage, world=world, param_bytes=pbytes, reduction=args.reduction,
                            checkpointing=ckpt != "off", checkpoint_every=every, ds_config=ds_cfg,
                            padding_mask=padding_mask_kept(args))
            vision_cached = not (args.no_vision_cache or args.train_vision_tower)
            mem_u = predict_chunks_memory(hf_config, counts, [sides_q, sides_t], geo, together=True, **settings)
            for chunk in args.chunk_sizes:
                lists = (chunked(sides_q, chunk, geo, args.chunk_tokens)
                         + chunked(sides_t, chunk, geo, args.chunk_tokens))
                fwd = sum_parts([chunk_forward_flops(hf_config, c, geo) for c in lists])
                fl = step_flops(fwd, cached=True, checkpointing=checkpointing,
                                vision_trained=args.train_vision_tower, vision_cached=not args.no_vision_cache)
                m = predict_chunks_memory(hf_config, counts, lists, geo, vision_cached=vision_cached, **settings)
                rows.append({
                    "stage": stage, "ckpt": ckpt, "checkpoint_every": every if ckpt != "off" else None,
                    "chunk": chunk, "chunk_tokens": args.chunk_tokens, "chunks_per_step": len(lists),
                    "model_tflop_per_step_per_rank": fl["model"] / 1e12,
                    "hardware_tflop_per_step_per_rank": fl["hardware"] / 1e12,
                    "uncached_hardware_tflop_per_step_per_rank": unc["hardware"] / 1e12,
                    "cached_over_uncached_flops": fl["hardware"] / unc["hardware"],
                    "mfu_ceiling": fl["model"] / fl["hardware"],
                    "forward_split_tflop": {k: v / 1e12 for k, v in fwd.items()
                                            if k not in ("tokens", "padded_tokens")},
                    "tokens_per_step_per_rank": fwd["tokens"],
                    "predicted_memory": m, "predicted_memory_gib": m["total"] / GIB,
                    "uncached_predicted_memory_gib": mem_u["total"] / GIB,
                })
    return {"benchmark": "throughput-prediction", "shape": args.shape, "params": counts,
            "world_size": world, "dtype": dtype_name, "pairs_per_rank": args.pairs_per_rank,
            "llm_layers": hf_config.text_config.num_hidden_layers,
            "vision_layers": hf_config.vision_config.num_hidden_layers,
            "deepstack_taps": list(getattr(hf_config.vision_config, "deepstack_visual_indexes", []) or []),
            "deepstack_taps_dropped": shapes.dropped_deepstack_taps(args.shape, args.llm_layers, args.vision_layers),
            "inputs": describe(args, geo), "rows": rows}
