"""Export: a checkpoint or a live engine -> a transformers model directory (safetensors) that
plain transformers, sentence-transformers and ``LlaveEmbedder`` load.
"""
