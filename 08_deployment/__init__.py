"""Chapter 08 — Systems & deployment (importable as ``ch08``)."""
