"""Chapter 09 — Advanced topics (importable as ``ch09``)."""
