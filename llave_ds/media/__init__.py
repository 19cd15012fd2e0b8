"""Images and videos from disk, and the `Side` that carries them to the formatter.

Knows nothing of models, MMEB rows or training: a path becomes a checked, decoded RGB image
or a few uniformly sampled frames, or a `MediaError` naming the file and the problem.
"""
