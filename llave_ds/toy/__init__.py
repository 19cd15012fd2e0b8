"""The offline toy world: tiny backbones built from configs, the synthetic image and video
tasks, the warm start, and the demo that runs the whole job on a CPU.
"""
