"""moe-vision: assembly of experts + fusion + projector + LLM, data, the built-in benchmark,
staged training, evaluation, the feature cache, sweeps, results, benchmarks and the CLI."""

__version__ = "0.1.0"
