"""Chapter 07 — Inference engineering (importable as ``ch07``)."""
