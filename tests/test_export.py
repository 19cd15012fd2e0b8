"""Export: consolidate 2-rank DeepSpeed checkpoints on one CPU process into transformers
directories that reload with plain transformers and give the training engine's embeddings.
The Qwen3-VL run trains Matryoshka sizes: its exports declare them, the others do not."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from llave_ds.cli import main as cli_main  # noqa: E402
from llave_ds.model.formatter import ProcessingConfig  # noqa: E402
from llave_ds.toy import tiny  # noqa: E402
from tests.multimodal import Side, noise_image  # noqa: E402

pytestmark = pytest.mark.slow  # 2-rank DeepSpeed training in the module fixture

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STEPS = 2


def pairs_for(rank: int, step: int):
    """4 hand-made pairs per rank and step: image queries, text targets (and one text query)."""
    base = 100 * rank + 10 * step
    queries = [Side("<|image_1|>\nwhat is in this picture?", noise_image(28, 28, base + 1)),
               Side("a question without an image"),
               Side("describe", noise_image(40, 30, base + 3)),
               Side("<|image_1|> which colour dominates", noise_image(28, 56, base + 4))]
    targets = [Side(f"answer number {base + i} with some words") for i in range(4)]
    return queries, targets


def probe_sides():
    """The fixed chunk whose embeddings are compared after export (has images: no dummy)."""
    return [Side("<|image_1|>\na probe image", noise_image(28, 28, 999)),
            Side("a longer probe text without any image at all"),
            Side("short", noise_image(56, 28, 998))]


QUERY_INSTRUCTION = "Find an answer: "
# Every processing field away from its default (the demo's system prompt among them), so an
# export that dropped one would format differently from training. The image-token caps are
# below what some of the pairs' and probe's images take (they get downscaled).
PROCESSING = {
    backbone: dict(max_length=128, max_image_tokens=cap, query_instruction=QUERY_INSTRUCTION,
                   target_instruction="Represent the answer: ", system_prompt="Embed.", padding_side="left",
                   prompt_format="llave", video_frames=4, video_max_side=48,
                   min_image_tokens=None if backbone == "llava_onevision" else 1)
    for backbone, cap in (("llava_onevision", 14), ("qwen2_vl", 1), ("qwen3_vl", 2))
}
# Fields a backbone has no use for stay at their defaults (LLaVA-OV's anyres has no minimum).
NOT_APPLICABLE = {"llava_onevision": {"min_image_tokens"}}
STOCK_PROCESSOR = {"llava_onevision": "LlavaOnevisionProcessor", "qwen2_vl": "Qwen2VLProcessor",
                   "qwen3_vl": "Qwen3VLProcessor"}
# Qwen3-VL checkpoints ship Qwen2-VL's image processor.
STOCK_IMAGE_PROCESSOR = {"llava_onevision": "LlavaOnevisionImageProcessor", "qwen2_vl": "Qwen2VLImageProcessor",
                         "qwen3_vl": "Qwen2VLImageProcessor"}

# backbone, ZeRO stage, LoRA rank per training run. The ZeRO-3 run goes last: while its
# model lives, transformers builds every from_pretrained under zero.Init.
RUNS = {
    "lora_zero1": ("qwen2_vl", 1, 4),
    "qwen3_zero2": ("qwen3_vl", 2, 0),
    "zero3": ("llava_onevision", 3, 0),
}


# objective.matryoshka_dims / matryoshka_weights per run (the others train the whole vector
# only). Size 8 has weight 0: no loss term trains it, so the export does not declare it.
MATRYOSHKA = {"qwen3_zero2": ([8, 16, 32, "full"], [0.0, 1.0, 1.0, 1.0])}
DECLARED_DIMS = [16, 32, 64]  # "full": the tiny models' width, 64


def run_config(tiny_dir, run_dir, backbone, lora_r, name=None):
    from llave_ds.model.embedding import ModelConfig
    from llave_ds.train import ProcessingConfig, TrainConfig

    cfg = TrainConfig(run_dir=str(run_dir), global_batch_size=8,
                      model=ModelConfig(path=str(tiny_dir), dtype="float32", lora_r=lora_r, lora_alpha=8.0),
                      processing=ProcessingConfig(**PROCESSING[backbone]))
    cfg.data.source = "hand-made pairs"
    if name in MATRYOSHKA:
        cfg.objective.matryoshka_dims, cfg.objective.matryoshka_weights = MATRYOSHKA[name]
    return cfg


def train_worker(rank, world_size, jobs):
    """Per run: load under ZeRO, 2 gradient-cache steps, probe embeddings, checkpoint,
    and export_from_engine (the end-of-training path)."""
    import gc

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s JIT build
    torch.set_num_threads(1)
    from llave_ds.config import load_config
    from llave_ds.core.gradcache import gradcache_step
    from llave_ds.export.model_dir import export_from_engine
    from llave_ds.model.embedding import load_embedding_model, trainable_parameters
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.train import TrainConfig
    from llave_ds.training import checkpoint as ckpt
    from llave_ds.training import engine as eng

    results = {}
    for name, job in jobs.items():
        run_dir = Path(job["run_dir"])
        cfg = load_config(TrainConfig, run_dir / "config.yaml")
        zero = {"stage": job["stage"]}
        if job["stage"] == 3:
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        ds = eng.complete_ds_config({"zero_optimization": zero, "bf16": {"enabled": False},
                                     "steps_per_print": 10 ** 9},
                                    local_batch_size=4, world_size=world_size, gradient_clipping=0.0, bf16=False)
        eng.attach_deepspeed_comm()
        model, processor = load_embedding_model(cfg.model, deepspeed_config=ds)
        fmt = InputFormatter.from_config(processor, model.backbone, cfg.processing)  # as train.py does
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=2e-2)
        engine = eng.build_engine(model, optimizer, ds)
        backend = eng.DeepSpeedStepBackend(engine)
        torch.manual_seed(0)
        losses = []
        for step in range(STEPS):
            queries, targets = pairs_for(rank, step)
            q_chunks = [fmt(queries[i:i + 2], "query") for i in (0, 2)]
            t_chunks = [fmt(targets[i:i + 2], "target") for i in (0, 2)]
            result = gradcache_step(backend, q_chunks, t_chunks, cfg.objective)  # as train.py does
            losses.append(float(result.output.loss.detach()))
        probe = fmt(probe_sides(), "query")
        engine.eval()
        with torch.no_grad():
            emb = engine(**probe).detach().clone()
        eng.save_checkpoint(engine, run_dir / "checkpoints", ckpt.tag_for_step(STEPS),
                            {"step": STEPS, "world_size": world_size})
        export_from_engine(engine, model, processor, fmt, job["engine_export"], cfg, dtype="float32",
                           summary={"steps": STEPS})
        results[name] = {"emb": emb, "losses": losses,
                         "probe": {k: v for k, v in probe.items() if k != "dummy_image"}}
        del engine, model, optimizer, backend
        gc.collect()
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs on 2 gloo ranks: ZeRO-3 full fine-tuning (LLaVA-OV) and ZeRO-1 LoRA
    (Qwen2-VL, tied head); one checkpoint each, written by both ranks."""
    from llave_ds.config import dump_config
    from tests.distributed_harness import run_distributed

    root = tmp_path_factory.mktemp("export")
    jobs, info = {}, {}
    for name, (backbone, stage, lora_r) in RUNS.items():
        tiny_dir = tiny.build_tiny_model_dir(root / f"tiny_{backbone}", backbone)
        run_dir = root / f"run_{name}"
        dump_config(run_config(tiny_dir, run_dir, backbone, lora_r, name), run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n"
                                               + json.dumps({"step": 2, "loss": 1.25}) + "\n")
        jobs[name] = {"run_dir": str(run_dir), "stage": stage, "engine_export": str(root / f"engine_export_{name}")}
        info[name] = {"backbone": backbone, "tiny": tiny_dir, "run_dir": run_dir, "lora": lora_r > 0,
                      "engine_export": root / f"engine_export_{name}"}
    outcomes = run_distributed(train_worker, 2, jobs, timeout_s=240, collective_timeout_s=60)
    for name in RUNS:
        info[name]["rank_results"] = [o.value[name] for o in outcomes]
    return {"root": root, "runs": info}


def export(checkpoint, out, *extra):
    return cli_main(["export", str(checkpoint), "--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def fp32_exports(trained):
    """fp32 export of each run through the CLI (the run dir for one, the checkpoints dir
    for the other: both ways of naming a checkpoint)."""
    out = {}
    for name, run in trained["runs"].items():
        source = run["run_dir"] if name == "zero3" else run["run_dir"] / "checkpoints"
        dest = trained["root"] / f"export_{name}"
        assert export(source, dest, "--dtype", "fp32") == 0
        out[name] = dest
    return out


PLAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    jobs = json.loads(sys.argv[1])
    results = {}
    for name, job in jobs.items():
        config = json.load(open(job["dir"] + "/config.json"))
        cls = getattr(transformers, config["architectures"][0])
        model = cls.from_pretrained(job["dir"], dtype=torch.float32).eval()
        AutoTokenizer.from_pretrained(job["dir"])
        AutoImageProcessor.from_pretrained(job["dir"])
        chunk = torch.load(job["chunk"])
        mask = chunk["attention_mask"]
        kwargs = {k: v for k, v in chunk.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
        if config["model_type"] in ("qwen2_vl", "qwen3_vl"):  # M-RoPE positions, as the processor's outputs give them
            kwargs["mm_token_type_ids"] = (chunk["input_ids"] == config["image_token_id"]).int()
        with torch.no_grad():
            hidden = model.model(input_ids=chunk["input_ids"], attention_mask=mask, use_cache=False,
                                 **kwargs).last_hidden_state
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)          # last non-pad token per row
        emb = F.normalize(hidden[torch.arange(hidden.shape[0]), last].float(), dim=-1)
        torch.save(emb, job["out"])
        results[name] = type(model).__name__
    assert not any(m == "llave_ds" or m.startswith("llave_ds.") for m in sys.modules), "llave_ds was imported"
    print(json.dumps(results))
""")


def _run_without_llave_ds(root, name: str, source: str, jobs: dict):
    """Run ``source`` as a fresh Python process (no llave_ds on its path) on ``jobs``; its
    last stdout line is JSON."""
    script = root / name
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    # LLAVE_DS_PLAIN_PYTHON: another interpreter for the "plain transformers user" (one with
    # torchvision, say: the CPU torch wheel here has no matching torchvision on PyPI).
    python = os.environ.get("LLAVE_DS_PLAIN_PYTHON") or PYTHON
    proc = subprocess.run([python, str(script), json.dumps(jobs)], cwd=str(root), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain_reload(trained, fp32_exports):
    """One fresh process, plain transformers only: reload each export, embed the probe."""
    root = trained["root"]
    jobs = {}
    for name, run in trained["runs"].items():
        chunk = root / f"probe_{name}.pt"
        torch.save(run["rank_results"][0]["probe"], chunk)
        jobs[name] = {"dir": str(fp32_exports[name]), "chunk": str(chunk), "out": str(root / f"plain_{name}.pt")}
    classes = _run_without_llave_ds(root, "plain_reload.py", PLAIN_SCRIPT, jobs)
    return {name: (torch.load(job["out"]), classes[name]) for name, job in jobs.items()}


def read_safetensors_dir(path: Path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


# ---------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_training_really_changed_the_weights_and_both_ranks_agree(trained):
    for name, run in trained["runs"].items():
        r0, r1 = run["rank_results"]
        torch.testing.assert_close(r0["emb"], r1["emb"], atol=1e-6, rtol=0)  # same probe, same weights
        assert r0["losses"] == r1["losses"], name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_export_reloads_with_plain_transformers_and_matches_the_engine(trained, fp32_exports, plain_reload, name):
    run = trained["runs"][name]
    emb, cls_name = plain_reload[name]
    engine_emb = run["rank_results"][0]["emb"]
    assert emb.shape == engine_emb.shape
    assert (emb - engine_emb).abs().max().item() <= 1e-5, (emb - engine_emb).abs().max()
    assert cls_name == {"llava_onevision": "LlavaOnevisionForConditionalGeneration",
                        "qwen2_vl": "Qwen2VLForConditionalGeneration",
                        "qwen3_vl": "Qwen3VLForConditionalGeneration"}[run["backbone"]]

    # The export is not the base model: training moved weights the probe depends on.
    exported, base = read_safetensors_dir(fp32_exports[name]), read_safetensors_dir(run["tiny"])
    # The tiny LLaVA-OV's LM head is untied: frozen, never run, left out of the export (docs/EXPORT.md).
    head = {"llava_onevision": "language_model.lm_head.weight"}.get(run["backbone"])
    assert head is None or head in base
    assert set(exported) == set(base) - {head}  # plain transformers names: no hf_model., no LoRA keys
    meta = json.loads((fp32_exports[name] / "llave_embedding.json").read_text())
    assert ("lm_head" in meta) == (head is not None)
    assert all(t.dtype == torch.float32 for t in exported.values())
    moved = max((exported[k] - base[k]).abs().max().item() for k in exported)
    assert moved > 1e-3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_llave_embedder_on_the_export_formats_like_training(trained, fp32_exports, name):
    """The prompt settings travel in llave_embedding.json: LlaveEmbedder formats the probe
    sides from raw text and images exactly as the training formatter did."""
    from llave_ds import LlaveEmbedder

    embedder = LlaveEmbedder.from_pretrained(fp32_exports[name], device="cpu")
    assert embedder.formatter.config == ProcessingConfig(**PROCESSING[trained["runs"][name]["backbone"]])
    sides = probe_sides()
    got = embedder.encode(texts=[s.text for s in sides], images=[s.image for s in sides], progress=False)
    engine_emb = trained["runs"][name]["rank_results"][0]["emb"]
    assert (got - engine_emb).abs().max().item() <= 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_export_from_run_dir_keeps_every_processing_field(trained, fp32_exports, name):
    """`llave-ds export` builds its formatter from the run's whole processing section: the
    export records every field, and LlaveEmbedder on it formats the probe token for token
    (and pixel for pixel) like the training formatter and like a formatter built directly
    from the run's ProcessingConfig."""
    import dataclasses

    from llave_ds import LlaveEmbedder
    from llave_ds.config import load_config
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.model.processors import load_processor
    from llave_ds.train import TrainConfig

    run = trained["runs"][name]
    processing = load_config(TrainConfig, run["run_dir"] / "config.yaml").processing
    defaults = ProcessingConfig()
    assert [f.name for f in dataclasses.fields(processing)  # every field that applies non-default
            if getattr(processing, f.name) == getattr(defaults, f.name)
            and f.name not in NOT_APPLICABLE.get(trained["runs"][name]["backbone"], ())] == []

    recorded = json.loads((fp32_exports[name] / "llave_embedding.json").read_text())["input_format"]
    assert {key: recorded[key] for key in ProcessingConfig.field_names()} == dataclasses.asdict(processing)

    embedder = LlaveEmbedder.from_pretrained(fp32_exports[name], device="cpu")
    direct = InputFormatter.from_config(load_processor(run["tiny"]), run["backbone"], processing)
    assert embedder.formatter.metadata() == direct.metadata()
    training_probe = run["rank_results"][0]["probe"]  # formatted by the training worker's formatter
    for role in ("query", "target"):
        got, want = embedder.formatter(probe_sides(), role), direct(probe_sides(), role)
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), (role, key)
        if role == "query":
            for key, tensor in training_probe.items():
                assert torch.equal(got[key], tensor), key
    text = embedder.formatter.tokenizer.decode(got["input_ids"][1][got["attention_mask"][1].bool()])
    assert text.startswith("<|im_start|>system\nEmbed.<|im_end|>\n<|im_start|>user\nRepresent the answer: ")


AUTO_PROCESSOR_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    jobs = json.loads(sys.argv[1])
    results = {}
    for name, job in jobs.items():
        image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 56, 3), dtype=np.uint8))
        out = {"torchvision": is_torchvision_available()}
        try:
            processor = AutoProcessor.from_pretrained(job["dir"])
        except ImportError as exc:  # the stock processors' video processor needs torchvision
            out["error"] = str(exc)
        else:
            out["class"] = type(processor).__name__  # a bare tokenizer when the class is unknown
            if hasattr(processor, "image_processor"):
                text = processor.image_token + "\\nwhat is this?"
                batch = processor(images=[image], text=[text], return_tensors="pt")
                image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
                out["image_tokens"] = int((batch["input_ids"] == image_token_id).sum())
                out["pixel_values"] = list(batch["pixel_values"].shape)
        # What works without torchvision too: the image processor and the tokenizer.
        image_processor = AutoImageProcessor.from_pretrained(job["dir"])
        tokenizer = AutoTokenizer.from_pretrained(job["dir"])
        out["image_processor"] = type(image_processor).__name__
        out["tokenizer_pad"] = tokenizer.pad_token
        out["image_pixel_values"] = list(image_processor([image], return_tensors="pt")["pixel_values"].shape)
        results[name] = out
    assert not any(m == "llave_ds" or m.startswith("llave_ds.") for m in sys.modules), "llave_ds was imported"
    print(json.dumps(results))
""")


@pytest.mark.timeout(300)
def test_auto_processor_on_the_export_is_the_stock_processor(trained, fp32_exports):
    """A plain transformers user gets the backbone's own processor class from the export,
    not a bare tokenizer. Without torchvision transformers cannot build that class (its
    video processor needs torchvision): then AutoProcessor must fail naming torchvision and
    the stock video processor, and the image processor and tokenizer load on their own."""
    import numpy as np
    from PIL import Image

    from llave_ds.model.formatter import InputFormatter
    from llave_ds.model.processors import load_processor

    root = trained["root"]
    jobs = {name: {"dir": str(fp32_exports[name])} for name in RUNS}
    results = _run_without_llave_ds(root, "auto_processor.py", AUTO_PROCESSOR_SCRIPT, jobs)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 56, 3), dtype=np.uint8))
    for name, run in trained["runs"].items():
        backbone, got, out = run["backbone"], results[name], fp32_exports[name]
        stock = STOCK_PROCESSOR[backbone]
        assert json.loads((out / "processor_config.json").read_text())["processor_class"] == stock
        assert json.loads((out / "tokenizer_config.json").read_text())["processor_class"] == stock
        # What llave-ds makes of the same image without a token cap (the stock processor has none).
        reference = InputFormatter(load_processor(out), backbone)
        batch = reference([Side("<|image_1|>", image)], "query")
        if got["torchvision"]:
            assert got["class"] == stock, got
            assert got["image_tokens"] == int((batch["input_ids"] == reference.image_token_id).sum())
            assert got["pixel_values"] == list(batch["pixel_values"].shape)
        else:
            # transformers derives the tiny Qwen3-VL's video processor from its (Qwen2-VL) image
            # processor: the export of a real checkpoint carries its video_preprocessor_config.json.
            video = {"llava_onevision": "LlavaOnevisionVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor",
                     "qwen3_vl": "Qwen2VLVideoProcessor"}[backbone]
            assert "error" in got and "Torchvision" in got["error"] and video in got["error"], got
        assert got["image_processor"].startswith(STOCK_IMAGE_PROCESSOR[backbone]), got
        assert got["tokenizer_pad"] == "<|endoftext|>"
        assert got["image_pixel_values"] == list(batch["pixel_values"].shape)


@pytest.mark.timeout(300)
def test_lora_export_is_merged(trained, fp32_exports):
    keys = read_safetensors_dir(fp32_exports["lora_zero1"])
    assert not [k for k in keys if "lora" in k or "base_layer" in k or k.startswith("base_model")]
    meta = json.loads((fp32_exports["lora_zero1"] / "llave_embedding.json").read_text())
    assert meta["lora_merged"] is True
    # Only the adapters trained: the merged weights moved only in the LM's adapted linears
    # (the vision tower has q/k/v projections of the same names: they must not move).
    base = read_safetensors_dir(trained["runs"]["lora_zero1"]["tiny"])
    moved = {k for k in base if not torch.equal(base[k], keys[k])}
    assert len(moved) == 2 * 7, sorted(moved)  # 2 layers x q/k/v/o/gate/up/down
    assert all("visual" not in k and k.endswith("_proj.weight") for k in moved), sorted(moved)


@pytest.mark.timeout(300)
def test_metadata_and_model_card(trained, fp32_exports):
    out = fp32_exports["zero3"]
    meta = json.loads((out / "llave_embedding.json").read_text())
    assert meta["pooling"] == "last_token" and meta["normalized"] is True
    assert meta["backbone"] == "llava_onevision" and meta["dim"] == 64
    assert meta["model_class"] == "LlavaOnevisionForConditionalGeneration"
    assert meta["export_dtype"] == "float32" and meta["lora_merged"] is False
    fmt = meta["input_format"]
    assert {key: fmt[key] for key in PROCESSING["llava_onevision"]} == PROCESSING["llava_onevision"]
    assert meta["source"]["step"] == STEPS and meta["source"]["world_size"] == 2
    card = (out / "README.md").read_text()
    assert "hand-made pairs" in card and '"steps": 2' in card and '"loss": 1.25' in card
    assert "query_instruction: 'Find an answer: '" in card and "system prompt `Embed.`" in card
    for name in ("config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json",
                 "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def unit_prefix(x: torch.Tensor, d: int) -> torch.Tensor:
    """The first d dims of each row scaled to unit length, in float64 (not llave_ds's truncate)."""
    prefix = x[:, :d].double()
    return (prefix / prefix.pow(2).sum(dim=1, keepdim=True).sqrt()).float()


MATRYOSHKA_CONFIG_FIELDS = ("is_matryoshka", "matryoshka_dimensions")  # what vLLM reads (docs/EXPORT.md)


@pytest.mark.timeout(300)
def test_matryoshka_export_declares_the_trained_sizes(trained, fp32_exports, caplog):
    """Both export paths of the Matryoshka run declare the trained sizes (resolved, the
    weight-0 size left out) in llave_embedding.json, in config.json's vLLM fields (as
    transformers loads them: what vLLM's ModelConfig reads) and in the model card; and
    LlaveEmbedder(dim=d) on the export is the engine's vectors' first d dims, re-normalised."""
    import logging

    from transformers import AutoConfig

    from llave_ds import LlaveEmbedder

    run = trained["runs"]["qwen3_zero2"]
    for out in (fp32_exports["qwen3_zero2"], run["engine_export"]):
        assert json.loads((out / "llave_embedding.json").read_text())["matryoshka_dims"] == DECLARED_DIMS
        config = json.loads((out / "config.json").read_text())
        assert {k: config[k] for k in MATRYOSHKA_CONFIG_FIELDS} == {"is_matryoshka": True,
                                                                   "matryoshka_dimensions": DECLARED_DIMS}
        hf_config = AutoConfig.from_pretrained(out)
        assert hf_config.is_matryoshka is True and hf_config.matryoshka_dimensions == DECLARED_DIMS
        card = (out / "README.md").read_text()
        section = card[card.index("## Matryoshka sizes"):card.index("## Usage")]
        assert "Trained at the sizes 16, 32, 64:" in section and "F.normalize(embedding[..., :d], dim=-1)" in section
        assert "truncate_dim=d" in section and "normalize_embeddings=True" in section and "dimensions" in section

    sides = probe_sides()
    engine_emb = run["rank_results"][0]["emb"]
    with caplog.at_level(logging.WARNING, logger="llave_ds.model.embedder"):
        embedder = LlaveEmbedder.from_pretrained(fp32_exports["qwen3_zero2"], device="cpu", dim=16)
        got = embedder.encode(texts=[s.text for s in sides], images=[s.image for s in sides], progress=False)
    assert not [r for r in caplog.records if r.name == "llave_ds.model.embedder"]  # 16 is a declared size
    assert got.shape == (3, 16) and (got - unit_prefix(engine_emb, 16)).abs().max().item() <= 1e-5


@pytest.mark.timeout(300)
def test_without_matryoshka_sizes_the_export_is_unchanged(trained, fp32_exports, tmp_path):
    """Runs without Matryoshka sizes export no new key anywhere; and the Matryoshka run's
    checkpoint exported with the sizes switched off in its config differs from its export with
    them only by those keys and the card's section: every other file is the same bytes."""
    import shutil

    import yaml
    from transformers import AutoConfig

    for name in set(RUNS) - set(MATRYOSHKA):
        out = fp32_exports[name]
        assert "matryoshka_dims" not in json.loads((out / "llave_embedding.json").read_text())
        assert not set(MATRYOSHKA_CONFIG_FIELDS) & set(json.loads((out / "config.json").read_text()))
        assert not any(hasattr(AutoConfig.from_pretrained(out), k) for k in MATRYOSHKA_CONFIG_FIELDS)
        card = (out / "README.md").read_text()
        assert "atryoshka" not in card[:card.index("## Training config")]  # the config says matryoshka_dims: null

    run = trained["runs"]["qwen3_zero2"]
    raw = yaml.safe_load((run["run_dir"] / "config.yaml").read_text())
    raw["objective"].update(matryoshka_dims=None, matryoshka_weights=None)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(run["run_dir"] / "metrics.jsonl", tmp_path / "metrics.jsonl")  # the card's final metrics
    on, off = fp32_exports["qwen3_zero2"], tmp_path / "off"
    assert export(run["run_dir"] / "checkpoints", off, "--dtype", "fp32", "--config", tmp_path / "config.yaml") == 0

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(on) == files(off)
    changed = {"config.json", "llave_embedding.json", "README.md"}
    for rel in set(files(on)) - changed:
        assert (on / rel).read_bytes() == (off / rel).read_bytes(), rel
    config = json.loads((on / "config.json").read_text())
    for key in MATRYOSHKA_CONFIG_FIELDS:
        del config[key]
    assert (off / "config.json").read_text() == json.dumps(config, indent=2, sort_keys=True) + "\n"
    meta = json.loads((on / "llave_embedding.json").read_text())
    del meta["matryoshka_dims"]
    assert (off / "llave_embedding.json").read_text() == json.dumps(meta, indent=2) + "\n"
    card, off_card = (on / "README.md").read_text(), (off / "README.md").read_text()
    card = card.replace(card[card.index("## Matryoshka sizes"):card.index("## Usage")], "")
    cut = "## Training config"  # the config itself differs: objective.matryoshka_dims
    assert off_card[:off_card.index(cut)] == card[:card.index(cut)]
    assert "atryoshka" not in off_card[:off_card.index(cut)]


@pytest.mark.timeout(300)
def test_bad_matryoshka_sizes_in_the_run_config_name_the_file(trained, tmp_path, capsys):
    import yaml

    run = trained["runs"]["qwen3_zero2"]
    raw = yaml.safe_load((run["run_dir"] / "config.yaml").read_text())
    raw["objective"].update(matryoshka_dims=[16, 128], matryoshka_weights=None)  # 128 > the width, 64
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    assert export(run["run_dir"] / "checkpoints", tmp_path / "out", "--config", config) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "matryoshka_dims" in err and "at most 64" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_export_from_engine_matches_the_checkpoint_export(trained, fp32_exports, name):
    """The end-of-training path (gathered on 2 ranks; LoRA merged from the gathered tensors)
    writes the same weights as the checkpoint path (peft merge_and_unload)."""
    run = trained["runs"][name]
    from_engine = read_safetensors_dir(run["engine_export"])
    from_ckpt = read_safetensors_dir(fp32_exports[name])
    # Same names too: the standard transformers layout, even though the ZeRO-3 model was
    # loaded with transformers' legacy renamings (language_model.model.model.* otherwise).
    assert set(from_engine) == set(from_ckpt)
    for key, tensor in from_engine.items():
        torch.testing.assert_close(tensor, from_ckpt[key], atol=2e-6, rtol=0, msg=key)
    meta = json.loads((run["engine_export"] / "llave_embedding.json").read_text())
    assert meta["lora_merged"] is run["lora"] and meta["input_format"]["query_instruction"] == QUERY_INSTRUCTION


@pytest.mark.timeout(300)
def test_sharded_bf16_export_has_a_consistent_index(trained, fp32_exports):
    run = trained["runs"]["zero3"]
    out = trained["root"] / "export_bf16_sharded"
    assert export(run["run_dir"] / "checkpoints" / f"step_{STEPS:08d}", out, "--max-shard-size", "100KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(set(weight_map.values())) == files
    seen = {}
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            for key in f.keys():
                seen[key] = file
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():
                    assert tensor.dtype == torch.bfloat16, key
    assert seen == weight_map  # every indexed tensor is in its file, and nothing else is
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = read_safetensors_dir(fp32_exports["zero3"])
    for key in weight_map:  # the same weights, rounded
        with safe_open(str(out / weight_map[key]), "pt") as f:
            torch.testing.assert_close(f.get_tensor(key), fp32[key].to(torch.bfloat16), atol=0, rtol=0)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import transformers
    original = transformers.PreTrainedModel.save_pretrained
    def slow_save(self, *args, **kwargs):
        original(self, *args, **kwargs)       # the weights are half of the directory
        open(sys.argv[3], "w").write("saved")
        time.sleep(120)
    transformers.PreTrainedModel.save_pretrained = slow_save
    from llave_ds.cli import main
    sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2], "--dtype", "fp32"]))
""")


@pytest.mark.timeout(300)
def test_killed_export_leaves_no_destination_and_a_rerun_succeeds(trained, tmp_path):
    run = trained["runs"]["zero3"]
    out, ready = tmp_path / "killed_export", tmp_path / "ready"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PYTHON, str(script), str(run["run_dir"]), str(out), str(ready)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the export never reached its save step"
            time.sleep(0.1)
        staging = list(tmp_path.glob(".killed_export.partial-*"))
        assert staging and list(staging[0].glob("*.safetensors"))  # really halfway through
        assert not out.exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # The leftover staging dir does not block the next export to the same place.
    assert export(run["run_dir"], out, "--dtype", "fp32") == 0
    assert (out / "llave_embedding.json").is_file() and (out / "config.json").is_file()


@pytest.mark.timeout(300)
def test_existing_destination_is_refused_without_force(trained, tmp_path, capsys):
    run = trained["runs"]["zero3"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert export(run["run_dir"], out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine" and not (out / "config.json").exists()
    assert export(run["run_dir"], out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".taken.*"))


@pytest.mark.timeout(300)
def test_clear_errors_name_the_path(trained, tmp_path, capsys):
    run = trained["runs"]["zero3"]
    ckpt = run["run_dir"] / "checkpoints" / f"step_{STEPS:08d}"

    def error_of(*args) -> str:
        capsys.readouterr()
        assert export(*args) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = error_of(empty, tmp_path / "o1")
    assert str(empty) in err and "not a checkpoint" in err

    incomplete = tmp_path / "run" / "checkpoints" / "step_00000007"
    incomplete.mkdir(parents=True)
    (incomplete.parent / "latest").write_text("step_00000007")
    err = error_of(incomplete.parent, tmp_path / "o2")
    assert str(incomplete) in err and "llave_complete.json" in err

    elsewhere = tmp_path / "moved" / "ckpts" / ckpt.name
    elsewhere.parent.mkdir(parents=True)
    elsewhere.symlink_to(ckpt, target_is_directory=True)
    err = error_of(elsewhere, tmp_path / "o3")
    assert "config.yaml" in err and str(elsewhere) in err and "--config" in err

    from llave_ds.config import dump_config, load_config
    from llave_ds.train import TrainConfig
    cfg = load_config(TrainConfig, run["run_dir"] / "config.yaml")
    cfg.model.path = str(tmp_path / "no_such_base")
    bad_cfg = dump_config(cfg, tmp_path / "bad" / "config.yaml")
    err = error_of(ckpt, tmp_path / "o4", "--config", bad_cfg)
    assert str(tmp_path / "no_such_base") in err and "--base-model" in err
    # --base-model points at the base where it lives on this machine.
    assert export(ckpt, tmp_path / "o5", "--config", bad_cfg, "--base-model", run["tiny"]) == 0
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


@pytest.mark.timeout(300)
def test_export_takes_the_runs_export_dtype_unless_told(trained, tmp_path):
    """A run whose config says export.dtype: float32 re-exports in float32 (as its own
    end-of-training export did); --dtype still overrides it."""
    import yaml

    run = trained["runs"]["zero3"]
    raw = yaml.safe_load((run["run_dir"] / "config.yaml").read_text())
    raw.setdefault("export", {})["dtype"] = "float32"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    checkpoint = run["run_dir"] / "checkpoints" / f"step_{STEPS:08d}"

    def dtypes(out):
        return {t.dtype for t in read_safetensors_dir(out).values() if t.is_floating_point()}

    assert export(checkpoint, tmp_path / "run_dtype", "--config", config) == 0
    assert dtypes(tmp_path / "run_dtype") == {torch.float32}
    assert export(checkpoint, tmp_path / "told", "--config", config, "--dtype", "bf16") == 0
    assert dtypes(tmp_path / "told") == {torch.bfloat16}


@pytest.mark.timeout(300)
def test_deepspeeds_own_zero_to_fp32_script_gives_the_exports_weights(trained, fp32_exports, tmp_path):
    """DeepSpeed's `zero_to_fp32.py`, as it sits in our checkpoints directory, run as a user
    would run it (its own process, no llave-ds), reconstructs exactly the weights of our fp32
    export of the ZeRO-3 run: every tensor, maximum difference 0 (the LM head, left out of the
    export, aside)."""
    import transformers
    run = trained["runs"]["zero3"]
    checkpoints = run["run_dir"] / "checkpoints"
    script = checkpoints / "zero_to_fp32.py"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PYTHON, str(script), str(checkpoints), str(tmp_path / "ds"), "--safe_serialization"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = read_safetensors_dir(tmp_path / "ds")
    config = json.loads((fp32_exports["zero3"] / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(fp32_exports["zero3"],
                                                                            dtype=torch.float32)
    ours = {"hf_model." + k: v for k, v in model.state_dict().items()}
    compared = [k for k in theirs if not k.endswith("lm_head.weight")]
    assert len(compared) >= 60 and set(compared) <= set(ours)
    assert max(float((theirs[k] - ours[k]).abs().max()) for k in compared) == 0.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["zero3", "qwen3_zero2"])
def test_deepspeeds_universal_converter_runs_on_our_checkpoints(trained, fp32_exports, tmp_path, name):
    """DeepSpeed's `ds_to_universal.py` converts our checkpoints (the client state carries the
    `universal_checkpoint_info` marker it requires), and the universal checkpoint's fp32 weights
    are exactly our fp32 export's (the LM head, left out of exports, aside)."""
    import transformers
    run = trained["runs"][name]
    step = sorted((run["run_dir"] / "checkpoints").glob("step_*"))[-1]
    env = {**os.environ, "PYTHONPATH": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step),
                           "--output_folder", str(tmp_path / "universal"), "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], env=env, capture_output=True, text=True, timeout=240,
                          cwd=str(tmp_path))
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    print(f"{name}: ds_to_universal took {seconds:.1f} s")
    params = {}
    for p in (tmp_path / "universal" / "zero").iterdir():
        if (p / "fp32.pt").is_file():
            saved = torch.load(p / "fp32.pt", weights_only=True)   # ZeRO-1/2: {"param": ...}; ZeRO-3: the tensor
            params[p.name] = (saved["param"] if isinstance(saved, dict) else saved).detach()
    config = json.loads((fp32_exports[name] / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(fp32_exports[name], dtype=torch.float32)
    ours = {"hf_model." + k: v for k, v in model.state_dict().items()}
    compared = [k for k in params if not k.endswith("lm_head.weight")]
    assert len(compared) >= 20 and set(compared) <= set(ours), sorted(set(compared) - set(ours))[:5]
    assert all(params[k].numel() == ours[k].numel() for k in compared)
    assert max(float((params[k].reshape(ours[k].shape) - ours[k]).abs().max()) for k in compared) == 0.0
