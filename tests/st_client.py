"""Encode with sentence-transformers alone, in a fresh process: ``python st_client.py JOB.json OUT.pt``.

Used by tests/test_st_export.py to show that an export loads with ``SentenceTransformer``
without llave-ds (this script never imports it, and checks so) and without
``trust_remote_code``. The job names export directories, image files and rows
(``[text or null, image name or null]``); an image name starting with ``path:`` is passed to
sentence-transformers as a path string, any other as an opened PIL image.

Without torchvision the stock processor classes cannot be built at all (their video
processor needs it, see docs/EXPORT.md), so this script then stubs the video processor
with a bare ``BaseVideoProcessor`` before loading; nothing here encodes video, and the text,
image and model code paths are the stock ones. With torchvision installed nothing is stubbed.
"""
import importlib.util
import json
import sys


def stub_video_processor() -> None:
    import transformers.models.auto.video_processing_auto as video_auto
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    class NoVideoProcessor(BaseVideoProcessor):
        pass

    class AutoNoVideoProcessor:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return NoVideoProcessor()

    video_auto.AutoVideoProcessor = AutoNoVideoProcessor  # what ProcessorMixin looks up by name
    check = ProcessorMixin.check_argument_for_proper_class

    def check_argument(self, name, argument):
        if name == "video_processor" and isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return check(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check_argument


def main(job_file: str, out_file: str) -> None:
    stubbed = importlib.util.find_spec("torchvision") is None
    if stubbed:
        stub_video_processor()
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    job = json.loads(open(job_file).read())

    def image(name):
        if name is None:
            return None
        if name.startswith("path:"):
            return job["images"][name[len("path:"):]]
        return Image.open(job["images"][name]).convert("RGB")

    def st_input(text, name):
        img = image(name)
        if img is None:
            return text
        return img if not text else {"text": text, "image": img}

    def row_features(model, x, prompt):
        f = model.preprocess([x], prompt=prompt or None)
        keep = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_sizes", "image_grid_thw")
        return {k: f[k][0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else f[k]
                for k in keep if k in f}

    out = {"stubbed_video_processor": stubbed, "exports": {}, "extra": []}
    models = {}
    for name, path in job["exports"].items():
        model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.float32})
        models[name] = model
        if "cases" not in job:
            continue
        inputs = [st_input(text, img) for text, img in job["cases"]]
        enc = dict(convert_to_tensor=True, batch_size=16)
        res = {
            "prompts": dict(model.prompts),
            "query": model.encode_query(inputs, **enc),
            "document": model.encode_document(inputs, **enc),
            "plain": model.encode(inputs, **enc),
            "query_one_by_one": torch.stack([model.encode_query([x], **enc)[0] for x in inputs]),
            "query_batches_of_3": model.encode_query(inputs, convert_to_tensor=True, batch_size=3),
            "query_left_padded": model.encode_query(inputs, processing_kwargs={"text": {"padding_side": "left"}},
                                                    **enc),
            "features": {role: [row_features(model, x, model.prompts[prompt]) for x in inputs]
                         for role, prompt in (("query", "query"), ("target", "document"))},
        }
        out["exports"][name] = res
    for extra in job.get("extra", []):
        model = models[extra["export"]]
        if "dtype" in extra:
            model = SentenceTransformer(job["exports"][extra["export"]], device="cpu",
                                        model_kwargs={"dtype": getattr(torch, extra["dtype"])})
        inputs = [st_input(text, img) for text, img in extra["rows"]]
        prompt = model.prompts[extra["prompt"]]
        if extra.get("expect_error"):
            try:
                model.encode(inputs, prompt=prompt or None)
                out["extra"].append({"error": None})
            except Exception as exc:  # noqa: BLE001 - the test checks which
                out["extra"].append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        out["extra"].append({
            "embeddings": model.encode(inputs, prompt=prompt or None, convert_to_tensor=True),
            "input_ids": [row_features(model, x, prompt)["input_ids"] for x in inputs],
        })
    truncate = job.get("truncate")
    if truncate:  # Matryoshka sizes: truncate_dim at load (with and without normalising) and per call
        inputs = [st_input(text, img) for text, img in job["cases"]]
        enc = dict(convert_to_tensor=True, batch_size=16)
        out["truncate"] = {}
        for d in truncate["dims"]:
            model = SentenceTransformer(job["exports"][truncate["export"]], device="cpu",
                                        model_kwargs={"dtype": torch.float32}, truncate_dim=d)
            raw = model.encode_query(inputs, **enc)
            out["truncate"][d] = {
                "dimension": model.get_embedding_dimension(),
                "raw": raw,
                "normalized": model.encode_query(inputs, normalize_embeddings=True, **enc),
                "similarity": model.similarity(raw, raw),
                "per_call": models[truncate["export"]].encode_query(inputs, truncate_dim=d, normalize_embeddings=True,
                                                                    **enc),
            }
    out["llave_ds_imported"] = sorted(m for m in sys.modules if m == "llave_ds" or m.startswith("llave_ds."))
    torch.save(out, out_file)


def run_snippets(job_file: str, out_file: str) -> None:
    """Execute usage snippets (code blocks of the model card) against export directories:
    the job gives ``snippets`` (name -> code using ``MODEL_DIR``), ``model_dir`` (the
    placeholder), ``dirs`` and ``cwd``; each run's ``queries`` and ``docs`` are saved."""
    import os

    if importlib.util.find_spec("torchvision") is None:
        stub_video_processor()
    import torch

    job = json.loads(open(job_file).read())
    os.chdir(job["cwd"])
    out = {}
    for directory in job["dirs"]:
        for name, code in job["snippets"].items():
            scope = {"__name__": "__snippet__"}
            exec(compile(code.replace(job["model_dir"], directory), f"<{name} snippet>", "exec"), scope)
            out[(directory, name)] = {k: torch.as_tensor(scope[k]).float() for k in ("queries", "docs", "scores")}
    out["llave_ds_imported"] = sorted(m for m in sys.modules if m == "llave_ds" or m.startswith("llave_ds."))
    torch.save(out, out_file)


if __name__ == "__main__":
    if sys.argv[1] == "--snippets":
        run_snippets(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
