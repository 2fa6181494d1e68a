"""Loading the attention blocks of real diffusion models into attention_ref, and back; tracing them.

* :func:`from_diffusers` — a diffusers ``Attention`` (self or cross);
* :func:`from_diffusers_transformer2d` — a diffusers ``Transformer2DModel`` (Stable Diffusion's spatial transformer);
* :func:`from_diffusers_joint` — the attention of SD3, SD3.5 and Flux (joint, two-stream, and one-stream), for
  :func:`attention_ref.blocks.joint_attention_forward`; :func:`flux_rope_tables` — a Flux call's RoPE tables;
* :func:`from_ldm_attnblock` — CompVis's VAE ``AttnBlock``;
* :func:`from_guided_diffusion` — OpenAI's ``AttentionBlock`` (legacy or new q/k/v order);
* :func:`to_diffusers` — reference parameters as a diffusers state dict (optionally loaded into a module);
* :func:`.attention_mask.mask_and_bias` — diffusers' ``attention_mask`` read by one rule (for the trace and the
  oracle's recorded calls);
* ``trace`` (the :class:`~attention_ref.interop.trace.Trace` class) — which pixels read which words: the attention
  weights of every ``Attention`` call of a diffusers model or pipeline, computed by the reference during a run
  (:mod:`.trace`, ``docs/trace.md``).

Each ``from_*`` returns ``(params, options)``: NumPy parameters (float64 by default) and the
keyword options of the matching ``*_forward``. A state dict is a mapping of names to torch
tensors or NumPy arrays; nothing is unpickled here. This is the only part of the package that
uses torch (and diffusers), and only the functions that take torch modules or return tensors import it (lazily).
"""

from .diffusers import from_diffusers, from_diffusers_transformer2d, to_diffusers
from .dit import flux_rope_tables, from_diffusers_joint
from .guided_diffusion import from_guided_diffusion
from .ldm import from_ldm_attnblock
from .trace import LayerRecord, Trace, trace

__all__ = [
    "from_diffusers",
    "from_diffusers_transformer2d",
    "from_diffusers_joint",
    "flux_rope_tables",
    "from_guided_diffusion",
    "from_ldm_attnblock",
    "to_diffusers",
    "trace",
    "Trace",
    "LayerRecord",
]
