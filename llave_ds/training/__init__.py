"""The parts of the training loop: the DeepSpeed engine (the only DeepSpeed glue), checkpoints,
the run directory, the optimizer settings and what each step logs. ``llave_ds.train`` composes them.
"""
