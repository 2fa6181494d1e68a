"""What the diffusion-transformer tests share: tiny diffusers modules with random weights, the names that map
them onto the reference's, and the comparison of two sets of gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from block_helpers import grad_errors

from attention_ref.blocks import init_joint_attention

# reference name → diffusers name of each projection (the norms have the same names on both sides)
DIFFUSERS_NAMES = {
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "out": "to_out.0",
    "add_q": "add_q_proj",
    "add_k": "add_k_proj",
    "add_v": "add_v_proj",
    "add_out": "to_add_out",
}


def flux_ids(M: int, h: int, w: int) -> np.ndarray:
    """Flux's position ids: text tokens (0, 0, 0), image tokens (0, row, col) row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([np.zeros(h * w), rows.ravel(), cols.ravel()], axis=-1)
    return np.concatenate([np.zeros((M, 3)), image])


def errors(ours: dict, theirs: dict) -> dict[str, float]:
    """Normwise relative error per key; a gradient that is 0 up to rounding on the diffusers side is compared
    with the largest gradient of all instead (its own size would make rounding noise look like an error)."""
    return grad_errors(ours, theirs, is_zero=lambda name, grad, largest: np.max(np.abs(grad)) < 1e-10 * largest)


@dataclass(frozen=True)
class DiffusersCase:
    """One diffusers module and the call that runs it."""

    family: str  # "sd3" (Attention + JointAttnProcessor2_0), "sd35_attn2", "flux", "flux_single"
    heads: int
    head_dim: int
    N: int = 6  # image tokens (Flux: from grid)
    M: int = 4  # text tokens (0 for one stream)
    context_dim: int | None = None  # SD3's added_kv_proj_dim; default the image width
    qk_norm: str | None = None
    context_pre_only: bool = False
    axes_dims: tuple[int, ...] = ()  # Flux's axes_dims_rope (sums to head_dim)
    grid: tuple[int, int] = (2, 3)  # Flux's image grid
    B: int = 2
    key_padding: bool = False  # Flux: a boolean attention_mask dropping some text tokens

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def randomise(module, rng: np.random.Generator) -> None:
    """Every weight of the module off its init, the zero-initialised ones and the norms' scales included."""
    import torch

    state = {}
    for name, p in module.named_parameters():
        if name.startswith("norm"):  # q/k norms: scale around 1, shift around 0
            value = (1.0 if name.endswith("weight") else 0.0) + 0.3 * rng.standard_normal(tuple(p.shape))
        elif p.ndim == 2:
            value = rng.standard_normal(tuple(p.shape)) / np.sqrt(p.shape[1])
        else:
            value = 0.3 * rng.standard_normal(tuple(p.shape))
        state[name] = torch.from_numpy(value)
    module.load_state_dict(state, strict=False)


def build_module(case: DiffusersCase, rng: np.random.Generator):
    """A float64 diffusers module of the case's family with random weights."""
    if case.family in ("sd3", "sd35_attn2"):
        from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

        joint = case.family == "sd3"
        module = Attention(
            query_dim=case.dim,
            added_kv_proj_dim=(case.context_dim or case.dim) if joint else None,
            dim_head=case.head_dim,
            heads=case.heads,
            out_dim=case.dim,
            context_pre_only=case.context_pre_only if joint else None,
            bias=True,
            processor=JointAttnProcessor2_0(),
            qk_norm=case.qk_norm,
            eps=1e-6,
        )
    else:
        from diffusers.models.transformers.transformer_flux import FluxAttention

        double = case.family == "flux"
        module = FluxAttention(
            query_dim=case.dim,
            added_kv_proj_dim=case.dim if double else None,
            dim_head=case.head_dim,
            heads=case.heads,
            out_dim=case.dim,
            context_pre_only=False if double else None,
            pre_only=not double,
            bias=True,
            eps=1e-6,
        )
    module = module.double().eval()
    randomise(module, rng)
    return module


def float64_rms_norms(module) -> None:
    """Swap diffusers' RMSNorm (whose mean square is float32 even in float64) for torch.nn.RMSNorm, the same map
    computed in the input's dtype, with the same scale."""
    import torch
    from diffusers.models.normalization import RMSNorm

    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(module, name, None)
        if isinstance(norm, RMSNorm):
            exact = torch.nn.RMSNorm(norm.dim, eps=norm.eps, elementwise_affine=norm.weight is not None).double()
            if norm.weight is not None:
                exact.weight.data = norm.weight.data.clone()
            setattr(module, name, exact)


def rotate_in_dtype(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb for Flux (interleaved pairs), computed in x's dtype instead of float32."""
    import torch

    cos, sin = freqs_cis
    shape = (1, -1, 1, cos.shape[-1]) if sequence_dim == 1 else (1, 1, -1, cos.shape[-1])
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # each pair (a, b) ...
    turned = torch.stack([-b, a], dim=-1).flatten(-2)  # ... turned a quarter: (-b, a)
    return x * cos.reshape(shape) + turned * sin.reshape(shape)


def our_params(module) -> dict[str, np.ndarray]:
    """The module's weights under the reference's names, (in, out) matrices."""
    inverse = {theirs: ours for ours, theirs in DIFFUSERS_NAMES.items()}
    params = {}
    for name, p in module.named_parameters():
        layer, kind = name.rsplit(".", 1)
        value = p.detach().numpy()
        params[f"{inverse.get(layer, layer)}.{kind}"] = value.T.copy() if value.ndim == 2 else value.copy()
    return params


def our_gradients(module) -> dict[str, np.ndarray]:
    inverse = {theirs: ours for ours, theirs in DIFFUSERS_NAMES.items()}
    grads = {}
    for name, p in module.named_parameters():
        layer, kind = name.rsplit(".", 1)
        g = p.grad.numpy()
        grads[f"{inverse.get(layer, layer)}.{kind}"] = g.T if g.ndim == 2 else g
    return grads


def two_streams(rng, *, qk_norm="rms_norm", N=5, M=3, C=6, D=4, heads=2, d=4, seed=0):
    """Image tokens ``(2, N, C)``, text tokens ``(2, M, D)`` and joint-attention parameters moved off their init."""
    params = init_joint_attention(C, D, heads=heads, head_dim=d, qk_norm=qk_norm, rng=seed)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    return rng.standard_normal((2, N, C)), rng.standard_normal((2, M, D)), params


def weighted_loss(rng: np.random.Generator, y: Any, y_context: Any) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """``(loss, dy, dy_context)``: ``loss = Σ y·dy (+ Σ y_context·dy_context)`` on torch tensors, with random ``dy``
    and ``dy_context`` (``None`` without a text output), so that the loss's gradient of each output is that array."""
    import torch

    dy = rng.standard_normal(tuple(y.shape))
    loss = (y * torch.from_numpy(dy)).sum()
    dy_context = None
    if y_context is not None:
        dy_context = rng.standard_normal(tuple(y_context.shape))
        loss = loss + (y_context * torch.from_numpy(dy_context)).sum()
    return loss, dy, dy_context


def flux_masks(dtype: Any) -> dict[str, Any]:
    """The ``attention_mask`` forms FluxAttnProcessor takes, by name, for a toy Flux call (L = 7 text + 24 image
    tokens, text first; sample 1's last 3 words padded). The additive ones and the bias in ``dtype`` (a torch
    dtype); each test picks the forms it checks by name."""
    import torch

    B, M, L, heads = 2, 7, 31, 2
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, M - 3 : M] = False
    per_head = torch.rand(heads, L, L, generator=torch.Generator().manual_seed(3)) > 0.3
    per_head[..., 0] = True  # every row keeps a key
    bias = torch.randn(1, 1, L, L, generator=torch.Generator().manual_seed(4))
    return {
        "boolean (B, L)": keep,
        "boolean (B, 1, 1, L)": keep[:, None, None, :],
        "additive (B, L)": torch.where(keep, 0.0, -10000.0).to(dtype),
        "additive -inf (B, 1, 1, L)": torch.where(keep, 0.0, -torch.inf).to(dtype)[:, None, None, :],
        "boolean per head (heads, L, L)": per_head,
        "bias per query (1, 1, L, L)": bias.to(dtype),
    }
