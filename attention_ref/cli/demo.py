"""``python -m attention_ref demo``: one self-attention forward and backward on a 4×4×8 map, step by step.

Every step is one library call; the walkthrough prints what it computes and the
shape it produces, then the attention weights of one query pixel laid out as
the 4×4 map, then the worst finite-difference error of the backward pass.
"""

from __future__ import annotations

import numpy as np

from ..attention import attention_backward, attention_forward
from ..gradcheck import numerical_gradient, rel_error
from ..ops import (
    group_norm_backward,
    group_norm_forward,
    linear_backward,
    linear_forward,
    merge_heads,
    split_heads,
)

H, W, C, HEADS, GROUPS = 4, 4, 8, 2, 4


def _params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def dense(n_in: int, n_out: int) -> np.ndarray:
        return rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)

    return {
        "norm.weight": 1.0 + 0.1 * rng.standard_normal(C),
        "norm.bias": 0.1 * rng.standard_normal(C),
        "q.weight": dense(C, C),
        "k.weight": dense(C, C),
        "v.weight": dense(C, C),
        "out.weight": dense(C, C),
        "out.bias": 0.1 * rng.standard_normal(C),
    }


def _forward(x: np.ndarray, p: dict[str, np.ndarray], say=lambda *a: None):
    say("x", x, "the input feature map (B, H, W, C)")
    h, gn = group_norm_forward(x, p["norm.weight"], p["norm.bias"], groups=GROUPS, eps=1e-6)
    say("h = GroupNorm(x)", h, f"{GROUPS} groups of {C // GROUPS} channels, over all pixels")
    tokens = h.reshape(1, H * W, C)  # (B, N, C), pixel (i, j) becomes token i·W + j
    say("tokens", tokens, "pixels flattened row-major: token = row·W + col")
    q, q_c = linear_forward(tokens, p["q.weight"])
    k, k_c = linear_forward(tokens, p["k.weight"])
    v, v_c = linear_forward(tokens, p["v.weight"])
    say("Q = h W_q", q, "one query per pixel; K = h W_k and V = h W_v alike")
    qh, kh, vh = (split_heads(t, HEADS) for t in (q, k, v))
    say("Q split into heads", qh, f"(B, heads, N, d): channel c = head·{C // HEADS} + j")
    o, attn = attention_forward(qh, kh, vh)
    say("P = softmax(Q Kᵀ/√d)", attn.weights, "weights: how much each pixel attends to every pixel")
    say("O = P V", o, "a weighted mean of values, per head")
    om = merge_heads(o)
    say("heads merged", om, "(B, N, C)")
    proj, o_c = linear_forward(om, p["out.weight"], p["out.bias"])
    y = x + proj.reshape(x.shape)
    say("y = x + O W_o + b_o", y, "residual: the block adds context to its input")
    return y, (gn, q_c, k_c, v_c, attn, o_c)


def _backward(dy: np.ndarray, caches) -> np.ndarray:
    gn, q_c, k_c, v_c, attn, o_c = caches
    dproj = linear_backward(dy.reshape(1, H * W, C), o_c)
    dheads = attention_backward(split_heads(dproj["x"], HEADS), attn)
    dtokens = sum(
        linear_backward(merge_heads(dheads[name]), cache)["x"] for name, cache in (("q", q_c), ("k", k_c), ("v", v_c))
    )
    dx_norm = group_norm_backward(dtokens.reshape(dy.shape), gn)["x"]
    return dy + dx_norm  # the residual passes dy straight through


def main() -> None:
    """Print the walkthrough."""
    rng = np.random.default_rng(0)
    params = _params(rng)
    x = rng.standard_normal((1, H, W, C))

    def say(name: str, a: np.ndarray, what: str) -> None:
        print(f"  {name:<24} {tuple(a.shape)!s:<18} {what}")

    print(f"Self-attention on a {H}×{W}×{C} map, {HEADS} heads, float64\n\nForward:")
    y, caches = _forward(x, params, say)

    query = (1, 2)
    token = query[0] * W + query[1]
    grid = caches[4].weights[0, 0, token].reshape(H, W)
    print(f"\nHead 0: the weights of query pixel {query} over the {H}×{W} map (they sum to {grid.sum():.6f}):")
    for row in grid:
        print("   " + " ".join(f"{w:6.3f}" for w in row))

    print("\nBackward, with L = Σ y · dy for a random dy:")
    dy = rng.standard_normal(y.shape)
    dx = _backward(dy, caches)
    print(f"  {'dL/dx':<24} {tuple(dx.shape)!s:<18} through out-proj, attention, q/k/v, group norm, residual")
    numeric = numerical_gradient(lambda t: _forward(t, params)[0], x.copy(), dy)
    err = rel_error(dx, numeric)
    verdict = "agrees" if err < 1e-7 else "DISAGREES"
    print(f"\nGradient check: relative error against central differences = {err:.2e} ({verdict}; expect < 1e-7)")
