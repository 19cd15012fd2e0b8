"""Evaluation: ``llave-ds eval``. MMEB (data, P@1, aggregates, per-subset score files,
similarity-gap analysis) and text-video retrieval (Recall@K).
"""
