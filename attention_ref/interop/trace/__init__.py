r"""``trace``: which pixels read which words in a diffusers model, computed by the reference.

::

    from attention_ref.interop import trace

    with trace(pipe) as tr:                        # a pipeline with .unet or .transformer, a model, ...
        image = pipe(prompt, num_inference_steps=25).images[0]
    maps = tr.word_maps(prompt, ["dog", "sofa"], pipe.tokenizer)     # (B, 2, h, w)

**What is recorded.** For every call of every attention module the trace knows — diffusers' ``Attention``
(Stable Diffusion's U-Nets and VAEs, ``Transformer2DModel``, PixArt, DiT, SD3's joint layers, Sana, the video
U-Nets of SVD and AnimateDiff), ``FluxAttention``, ``WanAttention`` — the attention weights are computed by the
reference's own operations (:mod:`attention_ref.ops`) from that module's own parameters and that call's actual
inputs. For the standard ``Attention`` (the chain of :func:`attention_ref.attention_layer_forward`, parameters
from :func:`attention_ref.interop.from_diffusers`):

.. math::
    n = \mathrm{GroupNorm}(h)\ \text{(if the module has one)}, \quad
    Q = n W_q + b_q, \quad K = s W_k + b_k, \quad
    P_j = \mathrm{softmax}(\text{scale}\cdot Q_j K_j^\top + \text{bias})

with ``s = n`` for self-attention and the context (``encoder_hidden_states``) for cross-attention,
heads split head-major, ``bias`` diffusers' additive ``attention_mask`` (``−inf`` entries are a
boolean mask: a query with no allowed key gets weights 0). The other families (:mod:`.families`) add their
steps: q/k norms, RoPE with the call's own tables, the joint layers' two streams (:mod:`.families.joint`,
:func:`attention_ref.interop.from_diffusers_joint`), Wan's norms across heads, Sana's ReLU linear attention.
Nothing of the module's output is used, so the weights are the same whatever processor is installed
(xformers, sliced, a custom one: the weights of this formula, which a processor that edits them does not
compute — ``verify=True`` says which layers those are) and whatever precision the model runs in, autocast
included: the inputs are converted exactly to ``dtype`` (float32 by default, float64 on request) and everything
is computed in it. The reference's code takes its array namespace from its inputs, so it runs on the call's
own torch tensors, on the model's device (CPU threads or GPU) — only the recorded maps (when they are read),
each call's timestep and the checks of its attention mask are copied to the host. Every softmax is taken in
chunks of rows (:func:`.weights.softmax_rows`), so that a large ``N × L`` never exists at once.

The kinds of maps (:data:`KINDS`; shapes with every head, ``heads="all"``; the head is dropped with the mean,
``heads="mean"``, the default):

* ``"cross"``: ``(B, heads, H, W, M)``, pixel ``(row, col)``'s weights over the ``M`` context tokens (a row
  sums to 1);
* ``"joint"`` (SD3, SD3.5, Flux): the same shape, an image token's weights on the ``M`` text tokens, taken from
  the one softmax over image and text keys: a row sums to the share of the token's attention that reads the
  text, not to 1;
* ``"self"``, only with ``self_queries``: the rows of the query pixels at fractional positions ``(y, x)`` in
  [0, 1], ``(B, heads, Q, H, W)`` — each query's weights over the key pixels laid out as a map. The position
  picks pixel ``row = min(⌊y·H⌋, H − 1)``, ``col = min(⌊x·W⌋, W − 1)`` at each layer's resolution (as the
  explorer does); only those rows are computed. ``self_queries="all"`` records every row, ``Q = H·W``. A joint
  layer's self rows (its part ``"self"``) sum to the share read from the image; Wan's to the share read from
  the query's own frame;
* ``"temporal"`` (SVD's temporal blocks, AnimateDiff's motion modules), only with ``self_queries``: at each
  query pixel, the ``F`` frames' weights over the ``K`` keys of the frame attention, ``(B, heads, Q, F, K)``.
  Never taken for a spatial map, even when ``F = H·W``.

An IP-Adapter layer gives its text part and each image part (``"ip0"``, …) a record of its own, each with
its own softmax, as IP-Adapter's processors compute them (:mod:`.families.ip_adapter`); a part that is not
traced is said in :attr:`Trace.skipped` and the summary, and never aborts the trace.

**Where each map sits.** A module called on a ``(B, C, H, W)`` map gets its grid from that input.
A module called on ``(B, N, C)`` tokens gets the ``(H, W)`` of the nearest enclosing module that is running on
a ``(B, C, H, W)`` input with ``H·W = N``, or ``(H/p)·(W/p) = N`` for that module's ``patch_size`` ``p`` (PixArt,
DiT, SD3, Sana: the patch grid) and the same batch. A temporal module on ``(B·H·W, F, C)`` gets its pixels' grid
from the enclosing ``(B·F, C, H, W)`` map; the spatial layers of a video U-Net have the ``B·F`` frames in their
batch. Flux's grid comes from the model's ``img_ids``; Wan's from its ``(B, C, F, H, W)`` input and patch size
(frames in the batch, ``b·F + f``). Nothing is guessed from ``N`` alone: with no such module a ``ValueError``
names the layer.

**Which layers.** ``layers=`` takes module paths, globs on them, kinds, or a predicate; a glob that matches no
module is refused at entry. A run that recorded nothing warns (:class:`TraceWarning`) with the calls it saw
and why none was kept (DiT has only self-attention: give ``self_queries``).

**Observe, don't replace.** The trace attaches forward pre-hooks (with keyword arguments) to the
attention modules and pre-/post-hooks to the modules that enclose them; it replaces no processor
and changes no tensor, so the model's output is bitwise the same as without it. Every hook is removed
when the ``with`` block ends, also after an exception. The weights are computed during the model's
forward pass: that is the trace's time overhead (see ``docs/trace.md``).

**Memory.** ``keep="sum"`` (default) keeps, per layer, the sum of its maps over the calls (the
denoising steps): memory does not grow with the number of steps. ``keep="all"`` keeps every call's
maps, so ``token_maps(timesteps=...)`` and the explorer's step slider can pick steps.

The package: :mod:`.weights` (the arithmetic), :mod:`.records` (what is kept), :mod:`.hooks` (the
:class:`Trace` and its hooks), :mod:`.grids` (where each map sits), :mod:`.reading` (maps, words, a summary),
:mod:`.pages` (the explorer pages: the trace's one use of :mod:`attention_ref.viz`, imported when a page is made,
since viz brings matplotlib, an optional extra), :mod:`.families` (one module per family of attention modules).
"""

from __future__ import annotations

from .hooks import Trace, trace
from .reading import TraceWarning
from .records import KINDS, LayerRecord, query_pixels
from .weights import attention_weights

__all__ = ["KINDS", "LayerRecord", "Trace", "TraceWarning", "attention_weights", "query_pixels", "trace"]
