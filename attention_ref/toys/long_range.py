r"""Toy 1: a self-attention block learns to look half a map away.

Data (:mod:`attention_ref.toys.pairs`): ``10×10`` maps with two pairs of
identical ``2×2`` patterns, the copies of a pair at least half the map apart;
each copy carries a ±1 message; the target at each pattern pixel is the
message of its partner copy.

Model, all through the library's forward and backward passes::

    z = [x, positional channels]              (B, 10, 10, 13)   pairs.positional_channels
    y = SelfAttentionBlock(z)                 (B, 10, 10, 13)   self_attention_forward, 1 head, GroupNorm(1)
    prediction = y W_r + b_r                  (B, 10, 10, 1)    linear_forward

Loss: mean squared error over pattern pixels. To solve it a query pixel must
put its weight on the partner copy: same code (content), far away (position).
Trained with Adam in NumPy.

``partner_attention`` is the mean, over every query pixel inside a pattern, of
the total weight it puts on the pixels of its partner copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import limited_threads
from ..blocks import init_self_attention, self_attention_backward, self_attention_forward
from ..blocks.params import prefixed, sub_params
from ..ops import linear_backward, linear_forward
from ._progress import toy_threads, train_steps
from .adam import Adam
from .pairs import PairMaps, make_pair_maps, positional_channels

__all__ = ["LongRangeResult", "partner_attention", "train_long_range"]

SIZE = 10
CODE_CHANNELS = 8
CHANNELS = CODE_CHANNELS + 1 + 4  # code, message, 4 positional channels
HEADS = 1
GROUPS = 1


def partner_attention(weights: np.ndarray, copy_id: np.ndarray) -> float:
    """Mean weight that query pixels inside a pattern put on their partner copy.

    Inputs:
        weights: ``(B, heads, N, N)`` self-attention weights, ``N = H·W``, token ``row·W + col``.
        copy_id: ``(B, H, W)``; ``-1`` background, copies ``2p`` and ``2p + 1`` are partners.

    Returns:
        The mean over batch, heads and pattern pixels of ``Σ_{j ∈ partner} P_ij``.
    """
    weights = np.asarray(weights)
    B = weights.shape[0]
    ids = np.asarray(copy_id).reshape(B, -1)  # (B, N)
    totals = []
    for b in range(B):
        for copy in np.unique(ids[b][ids[b] >= 0]):
            queries = np.flatnonzero(ids[b] == copy)
            partner = np.flatnonzero(ids[b] == (copy ^ 1))  # 2p ↔ 2p + 1
            # Σ_{j ∈ partner} P_ij, for each head and query   (heads, |queries|)
            totals.append(weights[b][:, queries][:, :, partner].sum(axis=-1).ravel())
    return float(np.mean(np.concatenate(totals)))


def block_input(data: PairMaps) -> np.ndarray:
    """``(B, S, S, 13)``: the map's channels followed by the 4 positional channels."""
    B, S = data.x.shape[0], data.x.shape[1]
    pe = np.broadcast_to(positional_channels(S), (B, S, S, 4))
    return np.concatenate([data.x, pe], axis=-1)


def model_forward(params: dict[str, np.ndarray], data: PairMaps) -> tuple[np.ndarray, tuple[Any, Any]]:
    """Prediction ``(B, S, S)`` and the caches ``(block, readout)``."""
    y, block_cache = self_attention_forward(block_input(data), sub_params(params, "attn."), heads=HEADS, groups=GROUPS)
    pred, read_cache = linear_forward(y, params["readout.weight"], params["readout.bias"])  # (B, S, S, 1)
    return pred[..., 0], (block_cache, read_cache)


def model_backward(dpred: np.ndarray, caches: tuple[Any, Any]) -> dict[str, np.ndarray]:
    """Gradients of every parameter from ``dpred = ∂L/∂prediction`` ``(B, S, S)``."""
    block_cache, read_cache = caches
    g_read = linear_backward(dpred[..., None], read_cache)
    g_block = self_attention_backward(g_read["x"], block_cache)
    grads = prefixed({k: v for k, v in g_block.items() if k != "x"}, "attn.")
    grads["readout.weight"], grads["readout.bias"] = g_read["W"], g_read["b"]
    return grads


def _loss(pred: np.ndarray, data: PairMaps) -> tuple[float, np.ndarray]:
    """Mean squared error over pattern pixels, and its gradient with respect to ``pred``."""
    inside = data.in_pattern
    count = inside.sum()
    err = (pred - data.target) * inside
    # L = Σ_inside (pred − target)² / count ;  ∂L/∂pred = 2 (pred − target) / count
    return float(np.sum(err * err) / count), 2.0 * err / count


def _accuracy(pred: np.ndarray, data: PairMaps) -> float:
    """Fraction of pattern pixels whose predicted sign is the partner's message."""
    inside = data.in_pattern
    return float(np.mean(np.sign(pred[inside]) == data.target[inside]))


@dataclass
class LongRangeResult:
    """What :func:`train_long_range` returns.

    params: the trained parameters; ``"attn.*"`` is the self-attention block
        (:func:`block_params`), ``"readout.*"`` the 1×1 readout.
    partner_attention, partner_attention_init: after training / at initialisation,
        on the evaluation maps.
    accuracy, accuracy_init: fraction of pattern pixels whose predicted sign is the
        partner's message (0.5 is chance).
    eval_data: the evaluation maps (:class:`~attention_ref.toys.pairs.PairMaps`).
    eval_input: ``(B, 10, 10, 13)``, what the block sees (maps plus positional channels).
    weights, weights_init: ``(B, 1, 100, 100)`` attention weights on the evaluation maps.
    losses: the training loss at every step; seconds: training wall time.
    """

    params: dict[str, np.ndarray]
    partner_attention: float
    partner_attention_init: float
    accuracy: float
    accuracy_init: float
    eval_data: PairMaps
    eval_input: np.ndarray
    weights: np.ndarray
    weights_init: np.ndarray
    losses: list[float] = field(repr=False)
    seconds: float
    heads: int = HEADS
    groups: int = GROUPS

    @property
    def block_params(self) -> dict[str, np.ndarray]:
        """The self-attention block's own parameters (keys as in :func:`attention_ref.init_self_attention`)."""
        return sub_params(self.params, "attn.")

    def block_forward(self, z: np.ndarray) -> tuple[np.ndarray, Any]:
        """The trained block on a block input ``z`` ``(B, H, W, 13)``: ``(y, cache)``."""
        return self_attention_forward(z, self.block_params, heads=self.heads, groups=self.groups)


def _evaluate(params: dict[str, np.ndarray], data: PairMaps) -> tuple[float, float, np.ndarray]:
    pred, (block_cache, _) = model_forward(params, data)
    weights = np.asarray(block_cache.weights)
    return partner_attention(weights, data.copy_id), _accuracy(pred, data), weights


def train_long_range(
    seed: int = 0,
    *,
    steps: int = 600,
    batch: int = 32,
    lr: float = 3e-3,
    eval_maps: int = 64,
    progress_bar: bool | None = None,
    threads: int | None = None,
) -> LongRangeResult:
    """Train the long-range toy (module docstring) and measure where the attention goes.

    Inputs:
        seed: everything random (initialisation, training maps, evaluation maps) follows from it.
        steps, batch, lr: Adam steps, maps per step (fresh maps every step), learning rate.
        eval_maps: held-out maps for the measurements.
        progress_bar: a tqdm bar; ``None`` shows it only in a terminal or a notebook.
        threads: the threads it trains on, attention_ref's and BLAS's; ``None``: ``ATTENTION_REF_NUM_THREADS``
            when set, else 1 (the toy's matrices are small: see :func:`toy_threads`).

    Returns:
        :class:`LongRangeResult`.
    """
    with limited_threads(toy_threads(threads)):
        init_rng, train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        params = prefixed(init_self_attention(CHANNELS, heads=HEADS, groups=GROUPS, rng=init_rng), "attn.")
        bound = 1.0 / np.sqrt(CHANNELS)
        params["readout.weight"] = init_rng.uniform(-bound, bound, (CHANNELS, 1))
        params["readout.bias"] = np.zeros(1)

        eval_data = make_pair_maps(eval_rng, eval_maps, size=SIZE, code_channels=CODE_CHANNELS)
        pa_init, acc_init, weights_init = _evaluate(params, eval_data)

        optimiser = Adam(params, lr=lr)

        def step(_: int) -> float:
            data = make_pair_maps(train_rng, batch, size=SIZE, code_channels=CODE_CHANNELS)
            pred, caches = model_forward(params, data)
            loss, dpred = _loss(pred, data)
            optimiser.step(model_backward(dpred, caches))
            return loss

        losses, seconds = train_steps(step, steps, desc="long-range toy", progress_bar=progress_bar)

        pa, acc, weights = _evaluate(params, eval_data)
        return LongRangeResult(
            params=params,
            partner_attention=pa,
            partner_attention_init=pa_init,
            accuracy=acc,
            accuracy_init=acc_init,
            eval_data=eval_data,
            eval_input=block_input(eval_data),
            weights=weights,
            weights_init=weights_init,
            losses=losses,
            seconds=seconds,
        )
