"""Shared fixtures: the backend every core test runs on, and seeded random inputs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from attention_ref.backend import to_numpy

HAS_TORCH = importlib.util.find_spec("torch") is not None

BACKENDS = [
    "numpy",
    "array_api_strict",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
]


def _converter(name: str) -> Callable[[Any], Any]:
    if name == "numpy":
        return lambda a: None if a is None else np.asarray(a)
    if name == "array_api_strict":
        import array_api_strict as xs

        return lambda a: None if a is None else xs.asarray(np.asarray(a))
    if name == "torch":
        import torch

        return lambda a: None if a is None else torch.asarray(np.asarray(a))
    raise ValueError(name)


class Backend:
    """A backend under test: ``be(a)`` converts a NumPy array into it; ``be.is_native(x)`` checks a result."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._convert = _converter(name)

    def __call__(self, a: Any) -> Any:
        return self._convert(a)

    def is_native(self, x: Any) -> bool:
        if self.name == "numpy":
            return isinstance(x, np.ndarray)
        if self.name == "array_api_strict":
            import array_api_strict as xs

            return isinstance(x, xs._array_object.Array)
        import torch

        return isinstance(x, torch.Tensor)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=BACKENDS)
def be(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def np_(x: Any) -> np.ndarray:
    """A result from any backend as NumPy."""
    return to_numpy(x)
