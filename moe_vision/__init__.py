"""moe-vision."""
