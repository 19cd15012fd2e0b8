"""The pure core: the distributed environment, the gathers, the loss and the gradient cache.

Knows nothing of models, data or DeepSpeed (tests/test_architecture.py checks it): the
gradient cache drives an abstract encode / backward / step backend.
"""
