"""llave-ds: hardness-weighted contrastive training of universal multimodal embedding
models (LLaVE) with gradient caching inside DeepSpeed ZeRO."""

__version__ = "0.1.0"

__all__ = ["LlaveEmbedder", "__version__"]


def __getattr__(name):
    # Lazy: ``import llave_ds`` stays free of torch / transformers imports.
    if name == "LlaveEmbedder":
        from llave_ds.model.embedder import LlaveEmbedder

        return LlaveEmbedder
    raise AttributeError(f"module 'llave_ds' has no attribute {name!r}")
