"""Chapter 06 — Quantization & sparsity (importable as ``ch06``)."""
