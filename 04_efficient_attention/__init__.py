"""Chapter 04 — Efficient attention (importable as ``ch04``)."""
