r"""Toy 2: a cross-attention block learns which pixels each word of a prompt names.

Data (:mod:`attention_ref.toys.scenes`): ``16×16`` scenes of two or three
coloured shapes and a prompt like ``<sot> blue triangle and red square <eot>``.

The task is retrieval through the prompt. Every colour word and every shape
word carries a random number (its *payload*, fresh at every step) in an extra
channel of its context vector — colour words in one channel, shape words in
another. Each pixel of an object must output the pair (payload of its colour
word, payload of its shape word); background pixels output (0, 0). Nothing in
the image tells the payloads: a pixel has to find its own object's two words
in the prompt, and the only path from the prompt to the pixels is the
cross-attention block.

Model, all through the library's forward and backward passes::

    f = ReLU(conv3×3(ReLU(conv3×3(ReLU(conv3×3(image))))))    (B, 16, 16, 16)   conv2d_forward
    context = [word embedding, colour payload, shape payload]  (B, 10, 18)       frozen text encoder
    y = CrossAttentionBlock(f, context, context_mask)           (B, 16, 16, 16)   cross_attention_forward, 1 head
    prediction = y W_r + b_r                                    (B, 16, 16, 2)    linear_forward

The convolutions (receptive field 7×7) give each pixel enough of its object's
outline to tell a square from a circle from a triangle; the colour it sees
directly. Loss: mean squared error over all pixels. Adam in NumPy, learning
rate decayed along a cosine.

With one head and outputs that average the values of the attended tokens, an
object pixel that puts half its weight on each of its two words and a
background pixel that puts its weight on ``<sot>``, ``and`` or ``<eot>``
(payload 0) solve the task exactly.

``iou[word]``: for every held-out scene whose prompt has ``word``, the word's
map of weights over the pixels is min–max normalised, thresholded at 0.5, and
compared with the true object mask (intersection over union); the mean over
scenes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import limited_threads
from ..blocks import cross_attention_backward, cross_attention_forward, init_cross_attention
from ..blocks.params import prefixed, sub_params
from ..ops import conv2d_backward, conv2d_forward, linear_backward, linear_forward
from ._progress import toy_threads, train_steps
from .adam import Adam
from .scenes import COLOURS, SHAPES, SIZE, VOCAB, Scenes, make_scenes, word_embeddings

__all__ = ["GroundingResult", "token_iou", "train_token_grounding"]

FEATURES = 16
CONVS = 3
HEADS = 1
GROUPS = 4
GROUNDED_WORDS = (*COLOURS, *SHAPES)
_COLOUR_IDS = [VOCAB.index(w) for w in COLOURS]
_SHAPE_IDS = [VOCAB.index(w) for w in SHAPES]


def token_iou(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU between a token's thresholded heat map and an object mask.

    Inputs:
        heatmap: ``(H, W)`` weights of one token over the pixels.
        mask: ``(H, W)`` bool, the true object.
        threshold: applied after min–max normalising the map to [0, 1].
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    lo, hi = heatmap.min(), heatmap.max()
    predicted = (heatmap - lo) >= threshold * (hi - lo) if hi > lo else np.zeros(heatmap.shape, dtype=bool)
    union = np.logical_or(predicted, mask).sum()
    return float(np.logical_and(predicted, mask).sum() / union) if union else 1.0


def make_context(scenes: Scenes, payload: np.ndarray) -> np.ndarray:
    """``(B, M, 18)``: each token's frozen embedding, then its colour and shape payload channels.

    ``payload`` ``(B, M)`` is written into channel 16 for colour words, 17 for shape
    words, and dropped for every other token.
    """
    is_colour = np.isin(scenes.words, _COLOUR_IDS)
    is_shape = np.isin(scenes.words, _SHAPE_IDS)
    channels = np.stack([payload * is_colour, payload * is_shape], axis=-1)  # (B, M, 2)
    return np.concatenate([word_embeddings()[scenes.words], channels], axis=-1)


def make_target(scenes: Scenes, payload: np.ndarray) -> np.ndarray:
    """``(B, 16, 16, 2)``: on each object, the payloads of its colour and its shape word; 0 elsewhere."""
    target = np.zeros((*scenes.images.shape[:3], 2))
    kinds = (np.isin(scenes.words, _COLOUR_IDS), np.isin(scenes.words, _SHAPE_IDS))
    for channel, is_kind in enumerate(kinds):
        for o in range(scenes.masks.shape[1]):
            names_o = is_kind & (scenes.token_object == o)  # (B, M): the one word of this kind naming object o
            value = np.sum(payload * names_o, axis=1)  # (B,)
            target[..., channel] += value[:, None, None] * scenes.masks[:, o]
    return target


def _relu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # y = max(x, 0); the cache is where x > 0, since ∂y/∂x = [x > 0]
    positive = x > 0
    return x * positive, positive


def features_forward(params: dict[str, np.ndarray], images: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """The conv stack: ``(B, 16, 16, 3)`` → ``(B, 16, 16, 16)`` and its caches."""
    caches = []
    h = images
    for i in range(CONVS):
        h, conv_cache = conv2d_forward(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding="same")
        h, positive = _relu_forward(h)
        caches.append((conv_cache, positive))
    return h, caches


def model_forward(
    params: dict[str, np.ndarray], scenes: Scenes, context: np.ndarray
) -> tuple[np.ndarray, tuple[Any, Any, Any]]:
    """Prediction ``(B, 16, 16, 2)`` and the caches ``(convs, block, readout)``."""
    f, conv_caches = features_forward(params, scenes.images)
    y, block_cache = cross_attention_forward(
        f, context, sub_params(params, "attn."), heads=HEADS, groups=GROUPS, context_mask=scenes.context_mask
    )
    pred, read_cache = linear_forward(y, params["readout.weight"], params["readout.bias"])
    return pred, (conv_caches, block_cache, read_cache)


def model_backward(dpred: np.ndarray, caches: tuple[Any, Any, Any]) -> dict[str, np.ndarray]:
    """Gradients of every trained parameter (the text encoder is frozen) from ``∂L/∂prediction``."""
    conv_caches, block_cache, read_cache = caches
    g_read = linear_backward(dpred, read_cache)
    g_block = cross_attention_backward(g_read["x"], block_cache)
    grads = prefixed({k: v for k, v in g_block.items() if k not in ("x", "context")}, "attn.")
    grads["readout.weight"], grads["readout.bias"] = g_read["W"], g_read["b"]
    dh = g_block["x"]
    for i in reversed(range(CONVS)):
        conv_cache, positive = conv_caches[i]
        # ReLU backward: dx = dy · [x > 0]
        g_conv = conv2d_backward(dh * positive, conv_cache)
        grads[f"conv{i}.weight"], grads[f"conv{i}.bias"] = g_conv["weight"], g_conv["bias"]
        dh = g_conv["x"]
    return grads


def _init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    context_dim = word_embeddings().shape[1] + 2
    params = prefixed(
        init_cross_attention(FEATURES, context_dim, heads=HEADS, groups=GROUPS, rng=rng),
        "attn.",
    )
    c_in = 3
    for i in range(CONVS):
        # He initialisation for a conv followed by ReLU: variance 2 / fan-in
        params[f"conv{i}.weight"] = rng.standard_normal((3, 3, c_in, FEATURES)) * np.sqrt(2.0 / (9 * c_in))
        params[f"conv{i}.bias"] = np.zeros(FEATURES)
        c_in = FEATURES
    bound = 1.0 / np.sqrt(FEATURES)
    params["readout.weight"] = rng.uniform(-bound, bound, (FEATURES, 2))
    params["readout.bias"] = np.zeros(2)
    return params


def grounding_iou(weights: np.ndarray, scenes: Scenes, threshold: float = 0.5) -> dict[str, float]:
    """Mean :func:`token_iou` per colour and shape word over ``scenes``.

    Inputs:
        weights: ``(B, heads, H·W, M)`` cross-attention weights (averaged over heads here).
        scenes: the scenes they come from.
    """
    weights = np.asarray(weights)
    B = weights.shape[0]
    maps = weights.mean(axis=1).reshape(B, SIZE, SIZE, -1)  # (B, H, W, M)
    scores: dict[str, list[float]] = {w: [] for w in GROUNDED_WORDS}
    for b in range(B):
        for t in np.flatnonzero(scenes.token_object[b] >= 0):
            word = VOCAB[scenes.words[b, t]]
            scores[word].append(token_iou(maps[b, :, :, t], scenes.masks[b, scenes.token_object[b, t]], threshold))
    return {w: float(np.mean(s)) for w, s in scores.items() if s}


@dataclass
class GroundingResult:
    """What :func:`train_token_grounding` returns.

    params: trained parameters: ``"conv{i}.*"`` the conv stack, ``"attn.*"`` the
        cross-attention block, ``"readout.*"`` the 1×1 readout.
    iou, iou_init: word → mean IoU of its thresholded map with its object, after
        training / at initialisation (held-out scenes).
    eval_scenes: the held-out :class:`~attention_ref.toys.scenes.Scenes`;
        eval_context ``(B, 10, 18)`` their context vectors.
    weights, weights_init: ``(B, 1, 256, 10)`` cross-attention weights on them.
    eval_loss, eval_loss_init: mean squared error on them (predicting 0 everywhere scores ≈ 0.2).
    losses: training loss per step; seconds: training wall time.
    """

    params: dict[str, np.ndarray]
    iou: dict[str, float]
    iou_init: dict[str, float]
    eval_scenes: Scenes
    eval_context: np.ndarray
    weights: np.ndarray
    weights_init: np.ndarray
    eval_loss: float
    eval_loss_init: float
    losses: list[float] = field(repr=False)
    seconds: float

    @property
    def mean_iou(self) -> float:
        """The mean of :attr:`iou` over the words."""
        return float(np.mean(list(self.iou.values())))

    def prompt(self, b: int) -> list[str]:
        """The words of held-out scene ``b``'s prompt (padding included)."""
        return self.eval_scenes.prompt(b)


def _evaluate(params: dict[str, np.ndarray], scenes: Scenes, context: np.ndarray, target: np.ndarray):
    pred, (_, block_cache, _) = model_forward(params, scenes, context)
    weights = np.asarray(block_cache.weights)
    return grounding_iou(weights, scenes), float(np.mean((pred - target) ** 2)), weights


def train_token_grounding(
    seed: int = 0,
    *,
    steps: int = 1200,
    batch: int = 16,
    lr: float = 8e-3,
    train_scenes: int = 1024,
    eval_scenes: int = 256,
    progress_bar: bool | None = None,
    threads: int | None = None,
) -> GroundingResult:
    """Train the grounding toy (module docstring) and score each word's attention map.

    Inputs:
        seed: everything random (initialisation, scenes, payloads) follows from it.
        steps, batch, lr: Adam steps, scenes per step, peak learning rate (cosine decay to a tenth).
        train_scenes: size of the pool of training scenes (payloads are fresh at every step).
        eval_scenes: held-out scenes for the measurements.
        progress_bar, threads: as for :func:`~attention_ref.toys.train_long_range`.

    Returns:
        :class:`GroundingResult`.
    """
    with limited_threads(toy_threads(threads)):
        init_rng, data_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        params = _init_params(init_rng)
        pool = make_scenes(data_rng, train_scenes)
        held_out = make_scenes(eval_rng, eval_scenes)
        eval_payload = eval_rng.standard_normal(held_out.words.shape)
        eval_context, eval_target = make_context(held_out, eval_payload), make_target(held_out, eval_payload)
        iou_init, loss_init, weights_init = _evaluate(params, held_out, eval_context, eval_target)

        optimiser = Adam(params, lr=lr)

        def step(i: int) -> float:
            scenes = pool.subset(data_rng.integers(0, train_scenes, size=batch))
            payload = data_rng.standard_normal(scenes.words.shape)
            target = make_target(scenes, payload)
            pred, caches = model_forward(params, scenes, make_context(scenes, payload))
            err = pred - target
            # L = mean (pred − target)² ;  ∂L/∂pred = 2 (pred − target) / size
            loss = float(np.mean(err * err))
            # learning rate: lr · (0.1 + 0.9 · ½ (1 + cos(π · i / steps)))
            lr_now = lr * (0.1 + 0.45 * (1.0 + np.cos(np.pi * i / steps)))
            optimiser.step(model_backward(2.0 * err / err.size, caches), lr=lr_now)
            return loss

        losses, seconds = train_steps(step, steps, desc="grounding toy", progress_bar=progress_bar)

        iou, loss, weights = _evaluate(params, held_out, eval_context, eval_target)
        return GroundingResult(
            params=params,
            iou=iou,
            iou_init=iou_init,
            eval_scenes=held_out,
            eval_context=eval_context,
            weights=weights,
            weights_init=weights_init,
            eval_loss=loss,
            eval_loss_init=loss_init,
            losses=losses,
            seconds=seconds,
        )
