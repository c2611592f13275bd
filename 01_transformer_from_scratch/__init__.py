"""Chapter 01 — Transformer from scratch (importable as ``ch01``)."""
