"""Evaluation: per-category accuracy on the built-in benchmark and VQA-style scoring
(:mod:`.evaluate`)."""
