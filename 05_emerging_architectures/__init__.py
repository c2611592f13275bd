"""Chapter 05 — Emerging architectures (importable as ``ch05``)."""
