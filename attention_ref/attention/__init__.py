"""Scaled dot-product attention and its variants."""

from .exact import AttentionCache, attention_backward, attention_forward

__all__ = ["AttentionCache", "attention_backward", "attention_forward"]
