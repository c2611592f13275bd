"""Chapter 04 — Efficient attention (importable as ``ch04``).

Importing ``ch04.flash_triton`` / ``ch04.flash_pytorch`` registers the ``flash_triton`` / ``flash_pytorch`` attention
implementations of the ch01 model (``GPTConfig(attn_impl=...)``). Importing anything that defines Triton kernels
(``ch04.triton_kernels`` and the modules using it) without a CUDA GPU switches Triton to its CPU interpreter
(``TRITON_INTERPRET=1``); see triton_kernels.py.
"""
