"""Shared utilities for every chapter: device, seeding, data, checkpoints, benchmarks, plots, CLI.

No lesson content lives here; see the chapters for that.
"""
