"""Chapter 10 — Capstone (importable as ``ch10``)."""
