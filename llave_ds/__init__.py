"""llave-ds: hardness-weighted contrastive training of universal multimodal embedding
models (LLaVE) with gradient caching inside DeepSpeed ZeRO."""

__version__ = "0.1.0"
