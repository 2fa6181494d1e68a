r"""``trace``: which pixels read which words in a diffusers model, computed by the reference.

::

    from attention_ref.interop import trace

    with trace(pipe) as tr:                        # a pipeline with .unet, a UNet, a Transformer2DModel, ...
        image = pipe(prompt, num_inference_steps=25).images[0]
    maps = tr.word_maps(prompt, ["dog", "sofa"], pipe.tokenizer)     # (B, 2, h, w)

**What is recorded.** For every call of every diffusers ``Attention`` module inside the model,
the attention weights are computed by the reference's own operations (:mod:`attention_ref.ops`, the
chain of :func:`attention_ref.attention_layer_forward`) from that module's own parameters (read with
:func:`attention_ref.interop.from_diffusers`) and that call's actual inputs:

.. math::
    n = \mathrm{GroupNorm}(h)\ \text{(if the module has one)}, \quad
    Q = n W_q + b_q, \quad K = s W_k + b_k, \quad
    P_j = \mathrm{softmax}(\text{scale}\cdot Q_j K_j^\top + \text{bias})

with ``s = n`` for self-attention and the context (``encoder_hidden_states``) for cross-attention,
heads split head-major, ``bias`` diffusers' additive ``attention_mask`` (``−inf`` entries are a
boolean mask: a query with no allowed key gets weights 0). Nothing of the module's output is
used, so the weights are the same whatever processor is installed (xformers, sliced, a custom
one: the weights of this formula, which a processor that edits them does not compute) and
whatever precision the model runs in, autocast included: the inputs are converted exactly to ``dtype``
(float32 by default, float64 on request) and everything is computed in it. The reference's code
takes its array namespace from its inputs, so it runs on the call's own torch tensors, on the
model's device (CPU threads or GPU) — only the recorded maps (when they are read), each call's
timestep and the checks of its attention mask are copied to the host.

* cross-attention: the ``(B, heads, H, W, M)`` maps (pixel ``(row, col)``'s weights over the ``M``
  context tokens), or their mean over the heads ``(B, H, W, M)`` (``heads="mean"``, the default);
* self-attention, only with ``self_queries``: the rows of the query pixels at fractional positions
  ``(y, x)`` in [0, 1], ``(B, heads, Q, H, W)`` or ``(B, Q, H, W)`` — each query's weights over the
  key pixels laid out as a map. The position picks pixel ``row = min(⌊y·H⌋, H − 1)``,
  ``col = min(⌊x·W⌋, W − 1)`` at each layer's resolution (as the explorer does); only those rows
  are computed. ``self_queries="all"`` records every row, ``Q = H·W`` (``N × N`` per head: large).

**Where each map sits.** A module called on a ``(B, C, H, W)`` map gets its grid from that input.
A module called on ``(B, N, C)`` tokens (every ``attn1``/``attn2`` inside a ``Transformer2DModel``)
gets the ``(H, W)`` of the nearest enclosing module that is running on a ``(B, C, H, W)`` input with
``H·W = N`` — the ``Transformer2DModel`` itself in a U-Net. Nothing is guessed from ``N`` alone:
with no such module a ``ValueError`` names the layer.

**Observe, don't replace.** The trace attaches forward pre-hooks (with keyword arguments) to the
``Attention`` modules and pre-/post-hooks to the modules that enclose them; it replaces no processor
and changes no tensor, so the model's output is bitwise the same as without it. Every hook is removed
when the ``with`` block ends, also after an exception. The weights are computed during the model's
forward pass: that is the trace's time overhead (see ``docs/trace.md``).

**Memory.** ``keep="sum"`` (default) keeps, per layer, the sum of its maps over the calls (the
denoising steps): memory does not grow with the number of steps. ``keep="all"`` keeps every call's
maps, so ``token_maps(timesteps=...)`` and the explorer's step slider can pick steps.
"""

from __future__ import annotations

from .hooks import Trace, trace
from .reading import TraceWarning
from .records import KINDS, LayerRecord, query_pixels
from .weights import attention_weights

__all__ = ["KINDS", "LayerRecord", "Trace", "TraceWarning", "attention_weights", "query_pixels", "trace"]
