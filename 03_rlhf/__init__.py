"""Chapter 03 — RLHF (importable as ``ch03``)."""
