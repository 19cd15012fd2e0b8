"""Training data: MMEB-format files -> rows -> pairs -> per-rank batches cut into chunks.

Knows nothing of models or training: the collator hands chunks of sides to a formatter
it is given.
"""
