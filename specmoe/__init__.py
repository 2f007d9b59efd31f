"""specmoe: predict which MoE experts upcoming layers will use, and prefetch them."""

__version__ = "0.1.0"
