"""featx: frozen-backbone feature caches, classical heads, and fine-tuning, compared fairly."""
__version__ = "0.1.0"
