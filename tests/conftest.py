"""Shared fixtures: the backend every core test runs on, and seeded random inputs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from attention_ref.backend import to_numpy

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")


def _why_no_gpu() -> str | None:
    """None when CuPy imports and sees a CUDA device; otherwise the reason the GPU tests skip."""
    if importlib.util.find_spec("cupy") is None:
        return "no GPU backend: CuPy is not installed (scripts/gpu_check.sh installs it)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver, no runtime: CuPy cannot reach a GPU
        return f"no GPU backend: CuPy sees no CUDA device ({type(err).__name__}: {err})"
    return None if count > 0 else "no GPU backend: CuPy sees no CUDA device"


WHY_NO_GPU = _why_no_gpu()
HAS_GPU = WHY_NO_GPU is None

BACKENDS = [
    "numpy",
    "array_api_strict",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
    # every test that takes `be` also runs on CuPy arrays on a GPU: `pytest -m gpu` selects exactly those runs
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=str(WHY_NO_GPU))]),
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
    if name == "cupy":
        import cupy

        return lambda a: None if a is None else cupy.asarray(np.asarray(a))
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
        if self.name == "cupy":
            import cupy

            return isinstance(x, cupy.ndarray)
        import torch

        return isinstance(x, torch.Tensor)

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=BACKENDS)
def be(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


@pytest.fixture(params=BACKENDS[1:])
def other_be(request: pytest.FixtureRequest) -> Backend:
    """Every backend but NumPy: for tests that compare a backend with NumPy (NumPy against itself proves nothing)."""
    return Backend(request.param)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (restored afterwards): the tests' models are tiny, and on a
    shared machine torch's thread pool only waits for a core (~20 ms per small op instead of ~1 ms).
    Modules take it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    if not HAS_TORCH:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def np_(x: Any) -> np.ndarray:
    """A result from any backend as NumPy."""
    return to_numpy(x)


# ---------------------------------------------------------------- the explorer's tests (tests/viz)
# Fixtures that several of tests/viz's modules take. They are here rather than in a tests/viz/conftest.py because
# conftest files outside packages all import as the module ``conftest``: a second one would replace this one for
# the ``from conftest import ...`` of every module collected after it. Their helpers sit beside those tests, in
# tests/viz, which pytest puts on sys.path when it imports a test module from there.


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium through chromedriver for one module's browser tests (tests/viz/browser_helpers.py)."""
    from browser_helpers import open_browser

    yield from open_browser(tmp_path_factory)


@pytest.fixture
def self_cache(rng: np.random.Generator) -> Any:
    """A self-attention block's cache on two random 4×6 maps (tests/viz/explorer_helpers.py)."""
    from explorer_helpers import make_self_cache

    return make_self_cache(rng)


@pytest.fixture
def cross_cache(rng: np.random.Generator) -> Any:
    """A cross-attention block's cache: two random 4×6 maps read 5 tokens (tests/viz/explorer_helpers.py)."""
    from explorer_helpers import make_cross_cache

    return make_cross_cache(rng)
