r"""Joint attention (MMDiT: SD3, SD3.5, Flux): two token streams, one softmax — what the trace records of it.

A joint layer projects the image tokens ``x`` and the text tokens ``c`` each with its own weights, joins queries
and keys into one sequence of ``L = N + M`` tokens (image first in SD3, text first in Flux), optionally rotates
them (Flux's RoPE), and takes one softmax per query over all ``L`` keys:

.. math::
    P = \mathrm{softmax}\big(\text{scale}\cdot \mathrm{RoPE}(Q)\,\mathrm{RoPE}(K)^\top\big), \qquad
    Q = [Q^x; Q^c], \ K = [K^x; K^c]

(:func:`attention_ref.blocks.joint_attention_forward`). The trace records, per call:

* ``kind="joint"``: the image queries' weights on the text keys, ``P[image rows, text columns]``, as
  ``(B, heads, H, W, M)`` on the image's patch grid. They come from the one softmax over all keys, so a row
  sums to the share of that image token's attention that reads the text (the rest reads the image), not to 1;
* ``kind="self"``, part ``"self"`` (with ``self_queries``): the query pixels' weights on the image keys,
  ``P[query rows, image columns]``, laid out on the grid; a row sums to the share read from the image.

A one-stream layer (SD3.5's ``attn2``, SD3's single blocks) is self-attention: ``kind="self"``, rows summing
to 1. Every softmax is taken in chunks of rows (:func:`..weights.softmax_rows`), only the columns kept.
"""

from __future__ import annotations

from typing import Any

from ....ops.rope import rope_forward
from ..weights import softmax_rows, stream_keys_queries

__all__ = ["record_joint"]


def _rotate(x: Any, cos: Any, sin: Any, rows: Any) -> Any:
    """RoPE of ``x (B, heads, R, d)`` with the table rows ``rows`` (a slice or an index tensor) of ``(L, d)``."""
    return rope_forward(x, cos[rows], sin[rows], pairs="interleaved")[0]


def record_joint(
    tracer: Any,
    name: str,
    grid: tuple[int, int],
    image: Any,
    text: Any,
    params: dict[str, Any],
    options: dict[str, Any],
    *,
    joined_text: int = 0,
    rope: tuple[Any, Any] | None = None,
    mask: Any = None,
    bias: Any = None,
) -> None:
    """Record one call of a joint or one-stream module (see the module docstring).

    Inputs:
        image: ``(B, N, C)`` the image tokens, or, with ``joined_text = M > 0``, Flux's single-stream input
            ``(B, M + N, C)``, text first, projected by one set of weights.
        text: ``(B, M, D)`` the text tokens of a two-stream module; ``None`` otherwise.
        params, options: from :func:`attention_ref.interop.from_diffusers_joint`, tensors of the trace's dtype.
        rope: ``(cos, sin)``, ``(L, d)`` in the joined order, the call's own tables; ``None`` without RoPE.
        mask: boolean ``(B or 1, heads or 1, 1 or L, L)`` (True = may attend) in the joined order, or ``None``;
            bias: added to the logits, the same shapes, or ``None``.
    """
    import torch

    B = image.shape[0]
    N = grid[0] * grid[1]
    M = joined_text if text is None else text.shape[1]
    text_first = options.get("order", "image_first") == "text_first" or joined_text > 0
    image_at = slice(M, M + N) if text_first else slice(0, N)
    text_at = slice(0, M) if text_first else slice(N, N + M)
    two_streams = M > 0
    want_joint = two_streams and tracer.wants(name, "joint")
    want_self = tracer.wants(name, "self")
    if not (want_joint or want_self):
        return
    heads = options["heads"]
    head = () if tracer.heads == "mean" else (heads,)
    # every key, in the joined order   (B, heads, L, d); the image queries   (B, heads, N, d)
    if joined_text:
        q_all, keys = stream_keys_queries(image, params, options)
        q_image = q_all[:, :, image_at]
    else:
        q_image, k_image = stream_keys_queries(image, params, options)
        keys = k_image
        if text is not None:
            _, k_text = stream_keys_queries(text, params, options, text=True, queries=False)
            keys = torch.cat([k_text, k_image] if text_first else [k_image, k_text], dim=2)
    L = keys.shape[2]
    if rope is not None:
        cos, sin = rope
        if cos.shape[0] != L:
            raise ValueError(f"{name}: RoPE tables of {cos.shape[0]} rows for a joined sequence of {L} tokens")
        keys = _rotate(keys, cos, sin, slice(0, L))
    image_rows = slice(image_at.start, image_at.stop)

    def queries(rows: Any) -> Any:
        """The image queries ``rows`` (indices among the image tokens), rotated at their joined positions."""
        q = q_image if rows is None else q_image[:, :, rows]
        if rope is None:
            return q
        at = image_rows if rows is None else rows + image_at.start
        return _rotate(q, cos, sin, at)

    def image_rows_of(a: Any, rows: Any) -> Any:
        """The rows of a mask or bias for the image queries ``rows`` (all of them: ``None``); one row as it is."""
        if a is None or a.shape[-2] == 1:
            return a
        joined = a[..., image_at, :]
        return joined if rows is None else joined[..., rows, :]

    if want_joint:
        # P[image rows, text columns] of the one softmax over all L keys   (B, [heads,] N, M)
        P = softmax_rows(queries(None), keys, options["scale"], mask=image_rows_of(mask, None),
                         bias=image_rows_of(bias, None), columns=text_at, reduce=tracer.head_reduce)  # fmt: skip
        tracer.add(name, "joint", grid, P.reshape(B, *head, *grid, M), heads=heads, keys=M,
                   note="a row sums to the share read from the text (one softmax over image and text)")  # fmt: skip
    if want_self:
        pixels, rows = tracer.query_rows(grid, image.device)
        # P[query rows, image columns]   (B, [heads,] Q, N)
        P = softmax_rows(queries(rows), keys, options["scale"], mask=image_rows_of(mask, rows),
                         bias=image_rows_of(bias, rows), columns=image_at, reduce=tracer.head_reduce)  # fmt: skip
        tracer.add(name, "self", grid, P.reshape(B, *head, P.shape[-2], *grid), heads=heads, keys=N, pixels=pixels,
                   part="self" if two_streams else None,
                   note="a row sums to the share read from the image" if two_streams else "")  # fmt: skip
