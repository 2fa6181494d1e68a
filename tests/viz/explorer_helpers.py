"""What the explorer's tests without a browser share: the caches of two small blocks, and the page's data read
back as its script reads it."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np

from attention_ref import cross_attention_forward, init_cross_attention, init_self_attention, self_attention_forward
from attention_ref.viz import Explorer

H, W, C = 4, 6, 8
TOKENS = ["<sot>", "a", "red", "cat", "<eot>"]


def make_self_cache(rng: np.random.Generator) -> Any:
    """A self-attention block's cache on two random 4×6 maps of 8 channels, 2 heads."""
    x = rng.standard_normal((2, H, W, C))
    _, cache = self_attention_forward(x, init_self_attention(C, heads=2, groups=4, rng=0), heads=2, groups=4)
    return cache


def make_cross_cache(rng: np.random.Generator) -> Any:
    """A cross-attention block's cache: two random 4×6 maps read the 5 :data:`TOKENS`, 2 heads."""
    x, context = rng.standard_normal((2, H, W, C)), rng.standard_normal((2, len(TOKENS), 7))
    params = init_cross_attention(C, 7, heads=2, groups=4, rng=1)
    _, cache = cross_attention_forward(x, context, params, heads=2, groups=4)
    return cache


def page_json(page: Explorer) -> dict:
    """The data object inside the page, as the page's script reads it."""
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page.html(), re.S)
    return json.loads(found.group(1))


def decoded(b64: str, dtype: str = "<f4") -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype)
