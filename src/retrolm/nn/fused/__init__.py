"""The C++ CPU kernels and their Python wrappers, each built on first use.

``extension.py`` builds ``csrc/*.cpp`` once per machine; ``train.py`` holds the training
kernels (norm + shift, rotary, cross-entropy, l2 normalisation, k-means assignment, linear +
GELU), ``decode.py`` the one-token decoding blocks, ``window.py`` the bf16 window attention.
Each says when it applies; the blocks that use them (``nn/norms.py``, ``nn/rotary.py``, ...)
keep the ATen path, the reference the kernels are tested against.
"""
