"""Chapter 02 — Distributed training (importable as ``ch02``)."""
