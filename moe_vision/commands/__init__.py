"""Subcommands of ``moe-vision``; each module exposes ``register(subparsers)``."""
