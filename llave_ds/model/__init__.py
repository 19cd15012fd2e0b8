"""The model: backbones, processors, the prompt formatter, the embedding model and the
inference embedder.

Knows nothing of training: an LMM reads a formatted chunk and returns one unit vector per row.
"""
