"""llave-ds's cached step beside sentence-transformers' CachedMultipleNegativesRankingLoss.

Same text encoder (a randomly initialised Qwen2 of the LLaVA-OV-0.5B LLM shape, or fewer
layers), same weights, same token tensors, same batch and mini-batch, the same loss
(one-directional InfoNCE, scale 20 = temperature 0.05, no hardness weighting: llave-ds's
objective with alpha 0 and symmetric off equals MNRL), plain PyTorch on one device, AdamW:

  sentence-transformers  SentenceTransformer(Transformer, Pooling("lasttoken"), Normalize)
                         + CachedMultipleNegativesRankingLoss(mini_batch_size=M); loss.backward()
  llave-ds               gradcache_step over TorchStepBackend: the same HF model, last-token
                         pooling, L2 norm; chunks of M rows

Both get the whole batch padded once to its longest row (what the ST collator does), and
their mini-batches are row slices of it. The first step's losses must agree (same weights,
same inputs): that is checked and printed, so the two really run the same computation.

    python benchmarks/peer_cached_mnrl.py --device cuda --pairs 64 --mini-batch 16
    python benchmarks/peer_cached_mnrl.py --device cpu --layers 2 --pairs 8 --mini-batch 4  # smoke

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_config(layers: int | None):
    from transformers import Qwen2Config

    from llave_ds.bench.shapes import shape_config
    text = shape_config("llava-ov-0.5b", llm_layers=layers).text_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        text.pop(key, None)
    return Qwen2Config(**text)


def make_batch(pairs: int, q_range: tuple[int, int], t_range: tuple[int, int], vocab: int, seed: int):
    """Right-padded token tensors of the whole batch, for queries and targets."""
    g = torch.Generator().manual_seed(seed)

    def side(lo: int, hi: int) -> dict:
        lengths = torch.randint(lo, hi + 1, (pairs,), generator=g)
        width = int(lengths.max())
        ids = torch.randint(300, vocab, (pairs, width), generator=g)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    return side(*q_range), side(*t_range)


class LastTokenEncoder(torch.nn.Module):
    """What llave-ds's EmbeddingModel does on text: last attended token, L2-normalised in fp32."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, input_ids, attention_mask):
        from llave_ds.model.embedding import last_token_index
        hidden = self.hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(hidden[rows, last_token_index(attention_mask)].float(), dim=-1)


def slices(features: dict, size: int) -> list[dict]:
    n = features["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in features.items()} for i in range(0, n, size)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, default=None, help="Qwen2 layers (default: 24, the 0.5B LLM)")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--query-tokens", default="40-120")
    p.add_argument("--target-tokens", default="10-60")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoModel

    from llave_ds.core.gradcache import TorchStepBackend, gradcache_step
    from llave_ds.core.objective import ObjectiveConfig
    from llave_ds.toy.tiny import build_tiny_tokenizer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = text_config(args.layers)
    q_range = tuple(int(x) for x in args.query_tokens.split("-"))
    t_range = tuple(int(x) for x in args.target_tokens.split("-"))
    query, target = make_batch(args.pairs, q_range, t_range, cfg.vocab_size, seed=0)
    query = {k: v.to(device) for k, v in query.items()}
    target = {k: v.to(device) for k, v in target.items()}
    tokens = int(query["attention_mask"].sum() + target["attention_mask"].sum())

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            base = AutoModel.from_config(cfg, dtype=dtype, attn_implementation=args.attn)
        base.save_pretrained(tmp)
        build_tiny_tokenizer().save_pretrained(tmp)  # ST's Transformer loads one; the tensors bypass it
        st = SentenceTransformer(modules=[
            Transformer(tmp, model_kwargs={"dtype": dtype, "attn_implementation": args.attn}),
            Pooling(cfg.hidden_size, pooling_mode="lasttoken"), Normalize()], device=str(device))
    ours = LastTokenEncoder(copy.deepcopy(base)).to(device)
    del base
    st.train()
    ours.train()
    # Dropout is 0 in Qwen2 configs; both see the same module in train mode anyway.

    st_loss = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=args.mini_batch)
    st_opt = torch.optim.AdamW(st.parameters(), lr=1e-5)

    def st_step() -> float:
        loss = st_loss([dict(query), dict(target)], None)
        loss.backward()
        st_opt.step()
        st_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    backend = TorchStepBackend(ours, ours_opt)
    objective = ObjectiveConfig(temperature=0.05, alpha=0.0, symmetric=False)
    q_chunks, t_chunks = slices(query, args.mini_batch), slices(target, args.mini_batch)

    def ours_step() -> float:
        return float(gradcache_step(backend, q_chunks, t_chunks, objective).output.loss.detach())

    # Interleaved, one step of each in turn, so clock and allocator drift hit both alike.
    steps = {"llave-ds gradcache_step": ours_step, "sentence-transformers CachedMNRL": st_step}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            losses[name].append(fn())
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = {name: {"step_s": statistics.median(times[name]), "step_s_all": times[name],
                   "first_loss": losses[name][0], "pairs_per_s": args.pairs / statistics.median(times[name])}
            for name in steps}
    a, b = rows["llave-ds gradcache_step"], rows["sentence-transformers CachedMNRL"]
    loss_diff = abs(a["first_loss"] - b["first_loss"])
    result = {
        "benchmark": "peer_cached_mnrl", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "pairs": args.pairs, "mini_batch": args.mini_batch, "tokens_per_step": tokens,
        "query_tokens": list(q_range), "target_tokens": list(t_range), "rows": rows,
        "first_loss_abs_diff": loss_diff, "llave_over_st": a["step_s"] / b["step_s"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
    }
    print(f"peer: Qwen2 {cfg.num_hidden_layers} layers x {cfg.hidden_size} ({result['dtype']}, {result['device_name']}), "
          f"{args.pairs} pairs, mini-batch {args.mini_batch}, {tokens} tokens/step, InfoNCE tau 0.05, AdamW")
    print(f"{'':<34} {'step s':>8} {'pairs/s':>8} {'first loss':>11}")
    for name, r in rows.items():
        print(f"{name:<34} {r['step_s']:>8.3f} {r['pairs_per_s']:>8.1f} {r['first_loss']:>11.5f}")
    print(f"llave-ds / sentence-transformers step time: {result['llave_over_st']:.3f}; "
          f"first-step losses differ by {loss_diff:.2e}")
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
