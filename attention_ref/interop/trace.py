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

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..ops.group_norm import group_norm_forward
from ..ops.heads import split_heads
from ..ops.linear import linear_forward
from ..ops.softmax import softmax_forward
from .aggregate import find_word_tokens, normalize_maps, prompt_token_ids, resize_maps
from .diffusers import from_diffusers

__all__ = ["LayerRecord", "Trace", "attention_weights", "query_pixels", "trace"]

HEADS = ("mean", "all")
KEEP = ("sum", "all")
DTYPES = ("float32", "float64")


def query_pixels(positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(Q, 2)`` int ``(row, col)`` of fractional positions ``(y, x)`` on an ``H×W`` grid.

    ``row = min(⌊y·H⌋, H − 1)``, ``col = min(⌊x·W⌋, W − 1)``: the pixel whose square holds the position
    (the rule of :func:`attention_ref.viz.pixels_of_positions`).
    """
    H, W = grid
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"positions must be (Q, 2) fractional (y, x) in [0, 1]; got {p.tolist()}")
    rows = np.minimum(np.floor(p[:, 0] * H), H - 1)
    cols = np.minimum(np.floor(p[:, 1] * W), W - 1)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def _check_positions(self_queries: Any) -> np.ndarray | str | None:
    """``None`` (no self-attention), ``"all"``, or ``(Q, 2)`` float64 positions in [0, 1]."""
    if isinstance(self_queries, str):
        if self_queries != "all":
            raise ValueError(f"self_queries must be fractional (y, x) positions or 'all', got {self_queries!r}")
        return "all"
    p = np.asarray(self_queries, dtype=np.float64)
    if p.size == 0:
        return None
    if p.ndim == 1 and p.shape == (2,):
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"self_queries must be (Q, 2) fractional (y, x) positions; got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"self_queries must lie in [0, 1]; got values from {p.min()} to {p.max()}")
    return p


def attention_weights(
    h: Array,
    params: dict[str, Array],
    options: dict[str, Any],
    *,
    context: Array | None = None,
    mask: Array | None = None,
    bias: Array | None = None,
    rows: Array | None = None,
) -> Array:
    """The attention weights of a diffusers ``Attention`` on one call, rows ``rows`` only.

    The chain of :func:`attention_ref.attention_layer_forward` up to the softmax, without the values
    and the output projection, and only for the query rows asked for. Any backend (the trace runs it on
    the model's own torch tensors, on the model's device).

    Inputs:
        h: ``(B, N, C)`` the call's tokens (a ``(B, C, H, W)`` input as ``(B, H·W, C)``, row-major).
        params, options: from :func:`attention_ref.interop.from_diffusers` (``heads``, ``scale``, and
            ``groups``, ``eps`` when the module has a group norm), h's dtype and backend.
        context: ``(B, M, D)`` for cross-attention, ``None`` for self-attention (keys are ``h``'s tokens).
        mask: boolean ``(B, 1, 1 or N, M)``, True = may attend; bias: ``(B, 1, 1 or N, M)`` added to the
            logits (diffusers' additive ``attention_mask``); both optional, rows of ``N`` as given.
        rows: ``(Q,)`` integer query tokens to compute (h's backend); ``None`` for all ``N``.

    Returns:
        ``(B, heads, Q, M)`` weights (``M = N`` for self-attention); each row sums to 1 (0 when every key
        of it is masked).
    """
    xp = namespace(h)
    # n = GroupNorm(h) over the N tokens of each sample, when the module has a group norm   (B, N, C)
    n = h
    if "norm.weight" in params:
        n, _ = group_norm_forward(h, params["norm.weight"], params.get("norm.bias"), groups=options["groups"],
                                  eps=options["eps"])  # fmt: skip
    # s = n (self-attention) or the context (cross-attention)   (B, M, C or D)
    s = n if context is None else context
    queries = n if rows is None else xp.take(n, rows, axis=1)  # (B, Q, C)
    # Q = n W_q + b_q   (B, Q, inner);   K = s W_k + b_k   (B, M, inner)
    q, _ = linear_forward(queries, params["q.weight"], params.get("q.bias"))
    k, _ = linear_forward(s, params["k.weight"], params.get("k.bias"))
    heads = options["heads"]
    qh, kh = split_heads(q, heads), split_heads(k, heads)  # (B, heads, Q, d), (B, heads, M, d)
    # S = (scale · Q_j) K_jᵀ   (B, heads, Q, M)
    logits = (options["scale"] * qh) @ xp.matrix_transpose(kh)
    if bias is not None:
        # S = scale · Q_j K_jᵀ + bias
        bias_rows = bias if rows is None or bias.shape[-2] == 1 else xp.take(bias, rows, axis=-2)
        logits = logits + bias_rows
    if mask is not None and rows is not None and mask.shape[-2] != 1:
        mask = xp.take(mask, rows, axis=-2)
    # P_j = softmax(S) over the allowed keys of each row   (B, heads, Q, M)
    weights, _ = softmax_forward(logits, axis=-1, mask=mask)
    return weights


def _mask_and_bias(attention_mask: Any, batch: int, queries: int, keys: int, dtype: Any, where: str) -> tuple[Any, Any]:
    """diffusers' ``attention_mask`` (a torch tensor) as ``(mask, bias)`` tensors ``(B, 1, 1 or N, M)``, or ``None``.

    A boolean mask (True = keep) is the mask. An additive one (diffusers turns ``encoder_attention_mask``
    into 0 / −10000) is the bias, converted to ``dtype``, and its ``−inf`` entries the mask. Shapes
    ``(B, M)``, ``(B, 1, M)``, ``(B, N, M)`` (``B`` may be 1).
    """
    import torch

    if attention_mask is None:
        return None, None
    a = attention_mask.detach()
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3 or a.shape[0] not in (1, batch) or a.shape[1] not in (1, queries) or a.shape[2] != keys:
        raise ValueError(
            f"{where}: attention_mask of shape {tuple(attention_mask.shape)} does not fit {batch} samples, "
            f"{queries} queries and {keys} keys (expected (B, M), (B, 1, M) or (B, N, M))"
        )
    a = a[:, None]  # (B, 1, 1 or N, M)
    if a.dtype == torch.bool:
        return a, None
    a = a.to(dtype)
    if torch.any(torch.isnan(a)) or torch.any(a == torch.inf):
        raise ValueError(f"{where}: attention_mask holds NaN or +inf")
    finite = torch.isfinite(a)
    mask = None if bool(torch.all(finite)) else finite
    bias = torch.where(finite, a, torch.zeros((), dtype=dtype, device=a.device))
    return mask, (bias if bool(torch.any(bias != 0)) else None)


@dataclass(eq=False)
class LayerRecord:
    """What the trace kept of one ``Attention`` module.

    Attributes:
        name: the module's path in the traced model, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        kind: ``"self"`` or ``"cross"``.
        grid: ``(H, W)`` of its query map.
        heads: the module's number of heads.
        keys: ``M`` (context tokens) for cross-attention, ``H·W`` for self-attention.
        batch: ``B`` of its calls.
        head_mean: the maps are the mean over the heads (``heads="mean"``).
        keep: ``"sum"`` or ``"all"``.
        query_pixels: ``(Q, 2)`` int ``(row, col)`` of the self-attention query rows; ``None`` for
            cross-attention and for every row (``self_queries="all"``).
        calls: how many calls were recorded.
        steps: for each call, the index of the traced model's call it happened in (a denoising step).
    """

    name: str
    kind: str
    grid: tuple[int, int]
    heads: int
    keys: int
    batch: int
    head_mean: bool
    keep: str
    query_pixels: np.ndarray | None = None
    calls: int = 0
    steps: list[int] = field(default_factory=list)
    _total: Array | None = field(default=None, repr=False)  # keep="sum": the running sum (the model's backend)
    _each: list[Array] = field(default_factory=list, repr=False)  # keep="all": each call's maps

    @property
    def queries(self) -> int:
        """``Q``: the number of query rows of a self-attention record (``H·W`` for every row)."""
        return self.grid[0] * self.grid[1] if self.query_pixels is None else len(self.query_pixels)

    @property
    def map_shape(self) -> tuple[int, ...]:
        """The shape of one call's maps (see :attr:`maps`)."""
        H, W = self.grid
        head = () if self.head_mean else (self.heads,)
        if self.kind == "cross":
            return (self.batch, *head, H, W, self.keys)
        return (self.batch, *head, self.queries, H, W)

    @property
    def maps(self) -> np.ndarray:
        """The recorded maps (read-only).

        ``keep="sum"``: their sum over the calls, one call's shape; ``keep="all"``: ``(calls, ...)``.
        One call's shape: cross-attention ``(B, heads, H, W, M)`` (``(B, H, W, M)`` with the head mean);
        self-attention ``(B, heads, Q, H, W)`` (``(B, Q, H, W)``): query row ``q``'s weights over the key
        pixels, laid out as a map.
        """
        if self.keep == "sum":
            out = to_numpy(self._total).copy() if self._total is not None else np.zeros(self.map_shape, np.float32)
        else:
            out = np.stack([to_numpy(a) for a in self._each]) if self._each else np.zeros((0, *self.map_shape))
        out.flags.writeable = False
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded maps."""
        held = [self._total] if self._total is not None else self._each
        return int(sum(a.nbytes for a in held))

    def _add(self, maps: Array, step: int) -> None:
        if maps.shape != self.map_shape:
            raise ValueError(
                f"{self.name}: a call gave maps of shape {maps.shape}, earlier calls {self.map_shape} "
                "(another batch size, resolution or prompt length: use one trace per run)"
            )
        if self.keep == "sum":
            if self._total is None:
                self._total = maps
            else:
                self._total = self._total + maps
        else:
            self._each.append(maps)
        self.calls += 1
        self.steps.append(step)

    def summed(self, steps: Iterable[int] | None = None) -> tuple[np.ndarray, int]:
        """``(sum of the head-mean maps over the calls, number of calls)``; ``steps`` picks calls (``keep="all"``).

        The sum has shape ``(B, H, W, M)`` for cross-attention, ``(B, Q, H, W)`` for self-attention.
        """
        if steps is None:
            if self.calls == 0:
                return np.zeros(self._mean_shape(), np.float32), 0
            total = to_numpy(self._total) if self.keep == "sum" else np.sum([to_numpy(a) for a in self._each], axis=0)
            count = self.calls
        else:
            if self.keep != "all":
                raise ValueError(f"{self.name}: picking steps needs the trace made with keep='all'")
            wanted = set(steps)
            chosen = [to_numpy(a) for a, s in zip(self._each, self.steps, strict=True) if s in wanted]
            if not chosen:
                return np.zeros(self._mean_shape(), np.float32), 0
            total, count = np.sum(chosen, axis=0), len(chosen)
        return (total if self.head_mean else total.mean(axis=1)), count

    def _mean_shape(self) -> tuple[int, ...]:
        shape = self.map_shape
        return shape if self.head_mean else (shape[0], *shape[2:])

    def explorer_layer(self, batch: int = 0, *, name: str | None = None) -> Any:
        """This layer as an :class:`attention_ref.viz.ExplorerLayer` for sample ``batch``.

        ``keep="sum"``: one step, the maps averaged over the calls; ``keep="all"``: one step per call.
        (Imports :mod:`attention_ref.viz`, hence matplotlib.)
        """
        from ..viz.explorer import ExplorerLayer

        if self.calls == 0:
            raise ValueError(f"{self.name}: no call was recorded")
        if not -self.batch <= batch < self.batch:
            raise ValueError(f"{self.name}: batch {batch} is outside the {self.batch} samples")
        H, W = self.grid
        per_call = [to_numpy(self._total) / self.calls] if self.keep == "sum" else [to_numpy(a) for a in self._each]
        steps = []
        for m in per_call:
            w = m[batch] if not self.head_mean else m[batch][None]  # (heads, H, W, M) or (heads, Q, H, W)
            if self.kind == "cross":
                steps.append(w.reshape(w.shape[0], H * W, self.keys))  # (heads, H·W, M)
            else:
                steps.append(w.reshape(w.shape[0], w.shape[1], H * W))  # (heads, Q, H·W)
        weights = np.clip(np.stack(steps), 0.0, 1.0)  # (S, heads, Q, K); averaging can round a hair past 1
        return ExplorerLayer(name or self.name, self.kind, self.grid, weights, query_pixels=self.query_pixels,
                             head_mean=self.head_mean)  # fmt: skip


def _root_module(model: Any) -> Any:
    """The ``torch.nn.Module`` to trace: the model itself, or a pipeline's ``.unet``."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    unet = getattr(model, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return unet
    raise TypeError(
        f"trace needs a torch.nn.Module holding diffusers Attention modules or a pipeline with .unet; "
        f"got {type(model).__name__}"
    )


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    for key in ("hidden_states", "sample", "x"):
        if key in kwargs:
            return kwargs[key]
    return None


def _timestep_value(t: Any) -> Any:
    """A model call's ``timestep`` as a float (a tuple of floats when it differs across the batch); else None."""
    if t is None:
        return None
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    try:
        a = np.asarray(t, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    if a.size == 0:
        return None
    return float(a[0]) if np.all(a == a[0]) else tuple(float(v) for v in a)


class Trace:
    """The attention weights of a diffusers model's ``Attention`` modules during a run (see the module docstring).

    Made by :func:`trace`; use as a context manager. After the ``with`` block:

    * ``tr.layers``: one :class:`LayerRecord` per traced module, in the order of their first call;
    * ``tr.timesteps``: the ``timestep`` of each call of the traced model (``None`` where it had none);
    * :meth:`token_maps`, :meth:`word_maps`: aggregated cross-attention maps;
    * :meth:`explorer`: the explorer page of the traced layers.
    """

    def __init__(
        self,
        model: Any,
        *,
        self_queries: Any = (),
        heads: str = "mean",
        keep: str = "sum",
        dtype: str = "float32",
    ) -> None:
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {list(HEADS)}, got {heads!r}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {list(KEEP)}, got {keep!r}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.model = model
        self.root = _root_module(model)
        self.positions = _check_positions(self_queries)
        self.heads = heads
        self.keep = keep
        self.dtype = np.dtype(str(dtype))
        self.layers: list[LayerRecord] = []
        self.timesteps: list[Any] = []
        self._records: dict[str, LayerRecord] = {}
        self._handles: list[Any] = []
        self._stack: list[tuple[str, tuple[int, ...] | None]] = []
        self._params: dict[str, tuple[tuple[Any, ...], tuple[dict[str, np.ndarray], dict[str, Any]]]] = {}
        self._used = False
        # the root's second positional argument is read as the timestep only where forward names it so
        # (UNet2DConditionModel, Transformer2DModel's keyword); a positional context is not a timestep
        try:
            names = list(inspect.signature(self.root.forward).parameters)
        except (TypeError, ValueError):
            names = []
        self._timestep_second = names[1:2] == ["timestep"]

    # ----- attaching and detaching ------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._used:
            raise RuntimeError("a Trace records one run; make a new one with trace(model)")
        self._used = True
        from diffusers.models.attention_processor import Attention

        attentions = [(n, m) for n, m in self.root.named_modules() if isinstance(m, Attention)]
        if not attentions:
            raise ValueError(f"{type(self.root).__name__} holds no diffusers Attention module")
        for name, module in attentions:  # refuse what the reference cannot express before attaching anything
            try:
                self._module_params(name, module)
            except NotImplementedError as err:
                raise NotImplementedError(f"{name or type(module).__name__}: {err}") from None
        modules = dict(self.root.named_modules())
        enclosing = sorted(
            {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in attentions} - {n for n, _ in attentions}
        )
        ancestors: set[str] = set()
        for n in enclosing:
            parts = n.split(".") if n else []
            ancestors.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        ancestors -= {n for n, _ in attentions}
        try:
            self._handles.append(self.root.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for n in sorted(ancestors):
                m = modules[n]
                self._handles.append(m.register_forward_pre_hook(self._enter_block(n), with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._leave_block(n), always_call=True))
            for n, m in attentions:
                self._handles.append(m.register_forward_pre_hook(self._on_attention(n), with_kwargs=True))
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    # ----- the hooks --------------------------------------------------------------------------------------
    def _on_model_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep")
        if t is None and len(args) > 1 and self._timestep_second:
            t = args[1]
        self.timesteps.append(_timestep_value(t))

    def _enter_block(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_input(args, kwargs)
            shape = tuple(x.shape) if getattr(x, "ndim", 0) == 4 else None
            self._stack.append((name, shape))

        return hook

    def _leave_block(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            for i in range(len(self._stack) - 1, -1, -1):
                if self._stack[i][0] == name:
                    del self._stack[i]
                    break

        return hook

    def _on_attention(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            attention_mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            self._record(name, module, hidden, context, attention_mask)

        return hook

    def _grid_of(self, name: str, hidden: Any) -> tuple[int, int]:
        if hidden.ndim == 4:
            return int(hidden.shape[2]), int(hidden.shape[3])
        N = int(hidden.shape[1])
        for block, shape in reversed(self._stack):
            inside = block == "" or name.startswith(block + ".")
            # the map's batch must be the tokens' too: a video U-Net's temporal attention runs on
            # (B·H·W, frames, C) inside a block whose map is (B·frames, C, H, W)
            if inside and shape is not None and shape[2] * shape[3] == N and shape[0] == hidden.shape[0]:
                return int(shape[2]), int(shape[3])
        raise ValueError(
            f"{name}: called on {N} tokens (B, N, C), and no enclosing module runs on a (B, C, H, W) map with "
            f"H·W = {N} and the same B; trace a model in which the attention sits in a block with a map input "
            "(a Transformer2DModel, a UNet)"
        )

    def _module_params(self, name: str, module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """``from_diffusers(module)`` in the trace's dtype, as tensors on the module's device.

        Read again only when a parameter changed (its storage, version counter, dtype or device).
        """
        import torch

        parameters = list(module.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        cached = self._params.get(name)
        if cached is None or cached[0] != key:
            params, options = from_diffusers(module, dtype=self.dtype)
            device = parameters[0].device if parameters else "cpu"
            cached = (key, ({k: torch.from_numpy(v).to(device) for k, v in params.items()}, options))
            self._params[name] = cached
        return cached[1]

    def _record(self, name: str, module: Any, hidden: Any, context: Any, attention_mask: Any) -> None:
        kind = "self" if context is None else "cross"
        if kind == "self" and self.positions is None:
            return
        if hidden.ndim not in (3, 4):
            raise ValueError(
                f"{name}: hidden_states of shape {tuple(hidden.shape)} is neither (B, N, C) nor (B, C, H, W)"
            )
        grid = self._grid_of(name, hidden)
        params, options = self._module_params(name, module)
        import torch

        torch_dtype = getattr(torch, self.dtype.name)
        # no autocast: the maps are computed in the trace's dtype, whatever precision the model runs in
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden  # (B, H·W, C), row-major
            h = tokens.detach().to(dtype=torch_dtype)  # (B, N, C), converted exactly (from float16, bfloat16, ...)
            B, N = h.shape[0], h.shape[1]
            ctx = None
            if context is not None:
                if not isinstance(context, torch.Tensor):
                    raise TypeError(
                        f"{name}: encoder_hidden_states is a {type(context).__name__}, not one (B, M, D) tensor "
                        "(IP-Adapter's (text, image) pairs are not traced)"
                    )
                if context.ndim != 3 or context.shape[0] != B:
                    shape = tuple(context.shape)
                    raise ValueError(f"{name}: encoder_hidden_states of shape {shape} is not (B, M, D) with B = {B}")
                ctx = context.detach().to(dtype=torch_dtype)  # (B, M, D)
            keys = N if ctx is None else ctx.shape[1]
            mask, bias = _mask_and_bias(attention_mask, B, N, keys, torch_dtype, name)
            pixels = rows = None
            if kind == "self" and isinstance(self.positions, np.ndarray):
                pixels = query_pixels(self.positions, grid)
                rows = torch.from_numpy(pixels[:, 0] * grid[1] + pixels[:, 1]).to(h.device)  # token row·W + col
            # (B, heads, Q, K), computed where the model runs
            P = attention_weights(h, params, options, context=ctx, mask=mask, bias=bias, rows=rows)
            H, W = grid
            heads = options["heads"]
            if kind == "cross":
                maps = P.reshape(B, heads, H, W, keys)  # (B, heads, H, W, M)
            else:
                maps = P.reshape(B, heads, P.shape[2], H, W)  # (B, heads, Q, H, W)
            if self.heads == "mean":
                maps = maps.mean(dim=1)  # (B, H, W, M) or (B, Q, H, W)
        record = self._records.get(name)
        if record is None:
            record = LayerRecord(name=name, kind=kind, grid=grid, heads=heads, keys=keys, batch=B,
                                 head_mean=self.heads == "mean", keep=self.keep, query_pixels=pixels)  # fmt: skip
            self._records[name] = record
            self.layers.append(record)
        elif record.kind != kind or record.grid != grid:
            raise ValueError(f"{name}: called as {kind}-attention at {grid}, earlier as {record.kind} at {record.grid}")
        record._add(maps, max(len(self.timesteps) - 1, 0))

    # ----- looking at what was recorded ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's recorded maps."""
        return sum(r.nbytes for r in self.layers)

    def layer(self, name: str) -> LayerRecord:
        """The record of the module at path ``name``."""
        if name not in self._records:
            raise KeyError(f"no traced layer {name!r}; the traced layers are {list(self._records)}")
        return self._records[name]

    @property
    def grids(self) -> list[tuple[int, int]]:
        """The distinct grids of the traced layers, largest first."""
        return sorted({r.grid for r in self.layers}, key=lambda g: (-g[0] * g[1], g))

    def select(
        self, layers: Any = None, *, kind: str | None = None, grid: tuple[int, int] | None = None
    ) -> list[LayerRecord]:
        """The records chosen by ``layers`` (names, records or a predicate; ``None``: all), ``kind`` and ``grid``."""
        if layers is None:
            chosen = list(self.layers)
        elif callable(layers):
            chosen = [r for r in self.layers if layers(r)]
        else:
            if isinstance(layers, (str, LayerRecord)):
                layers = [layers]
            chosen = [r if isinstance(r, LayerRecord) else self.layer(r) for r in layers]
        if kind is not None:
            chosen = [r for r in chosen if r.kind == kind]
        if grid is not None:
            chosen = [r for r in chosen if r.grid == tuple(grid)]
        return chosen

    def _steps(self, timesteps: Any) -> list[int] | None:
        if timesteps is None:
            return None
        if self.keep != "all":
            raise ValueError("picking timesteps needs the trace made with keep='all' (keep='sum' keeps only the sum)")
        n = len(self.timesteps)
        picked = [int(t) + n if int(t) < 0 else int(t) for t in np.atleast_1d(np.asarray(timesteps))]
        bad = [t for t in picked if not 0 <= t < n]
        if bad:
            raise ValueError(f"timesteps {bad} are outside the {n} traced model calls (0 … {n - 1})")
        return picked

    def token_maps(
        self,
        size: int | tuple[int, int] | None = None,
        *,
        layers: Any = None,
        grid: tuple[int, int] | None = None,
        timesteps: Any = None,
        normalize: str = "mean",
        interpolation: str = "bilinear",
        word_tokens: Sequence[int] | None = None,
    ) -> np.ndarray:
        """``(B, M, h, w)``: every token's cross-attention map, over layers and calls, at one size.

        Each chosen cross-attention layer's maps, averaged over its heads and summed over its calls, are
        resized to ``size`` (:func:`attention_ref.interop.aggregate.resize_maps`), summed over the layers,
        and normalised (:mod:`attention_ref.interop.aggregate` describes each choice).

        Inputs:
            size: ``(h, w)`` or ``s`` for ``(s, s)``; default the largest grid among the chosen layers
                (give the image's size to lay the maps over the image).
            layers: names, records or a predicate on a :class:`LayerRecord`; default every cross layer.
            grid: keep only the layers at this ``(H, W)`` (one resolution).
            timesteps: indices of the traced model's calls (denoising steps, 0 = first; negative from
                the end) to include; needs ``keep="all"``. Default all.
            normalize: ``"mean"`` (default: the average weight; tokens sum to 1 at every pixel),
                ``"sum"``, ``"minmax"`` (each map to [0, 1]), ``"daam"`` (each pixel renormalised over
                ``word_tokens``, DAAM's ``normalize=True``).
            interpolation: ``"bilinear"`` (default), ``"nearest"``, ``"bicubic"`` (clamped at 0, DAAM's),
                ``"area"``.
            word_tokens: token indices for ``"daam"`` (:meth:`word_maps` finds them from the prompt).

        Returns:
            float64 ``(B, M, h, w)``.
        """
        chosen = self.select(layers, kind="cross", grid=grid)
        if not chosen:
            raise ValueError("no cross-attention layer was traced (or chosen); is the model conditioned on a context?")
        shapes = {(r.batch, r.keys) for r in chosen}
        if len(shapes) != 1:
            raise ValueError(f"the chosen layers differ in batch size or number of tokens: {sorted(shapes)}")
        B, M = shapes.pop()
        if size is None:
            size = max((r.grid for r in chosen), key=lambda g: g[0] * g[1])
        elif isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        h, w = (int(v) for v in size)
        steps = self._steps(timesteps)
        total = np.zeros((B, M, h, w), np.float64)
        count = 0
        for r in chosen:
            summed, n = r.summed(steps)  # (B, H, W, M) over n calls
            if n == 0:
                continue
            total += resize_maps(np.moveaxis(summed, -1, 1).astype(np.float64), (h, w), interpolation)
            count += n
        if count == 0:
            raise ValueError(f"no call of the chosen layers happened at timesteps {steps}")
        return normalize_maps(total, count, normalize, word_tokens)

    def word_maps(
        self,
        prompt: str,
        words: str | Sequence[str],
        tokenizer: Any,
        *,
        merge: str = "sum",
        normalize: str = "mean",
        **token_maps_options: Any,
    ) -> np.ndarray:
        """``(B, len(words), h, w)``: each word's map, its sub-word tokens merged.

        Inputs:
            prompt: the prompt the context was encoded from (token 0 of the context is the tokenizer's
                first token of ``prompt``).
            words: a word or a list of words; each is tokenized alone (without start/end tokens) and
                every occurrence of its token sequence in the prompt's tokens is merged.
            tokenizer: a Hugging Face tokenizer (``pipe.tokenizer``), or anything with its call
                ``tokenizer(text, add_special_tokens=...)["input_ids"]`` and ``all_special_ids``.
            merge: ``"sum"`` (default: the weight a pixel gives the word) or ``"mean"`` (DAAM's) of the
                word's token maps.
            normalize: as in :meth:`token_maps`; ``"daam"`` renormalises over the prompt's tokens that
                are not special; ``"minmax"`` is applied to the merged word maps.
            token_maps_options: ``size``, ``layers``, ``grid``, ``timesteps``, ``interpolation`` of
                :meth:`token_maps`.

        Raises:
            ValueError naming the word's tokens and the prompt's when a word is not in the prompt, or
            when the prompt has more tokens than the traced context.
        """
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        words = [words] if isinstance(words, str) else list(words)
        ids = prompt_token_ids(tokenizer, prompt, special=True)
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        word_tokens = [i for i, t in enumerate(ids) if t not in special]
        positions = []
        for word in words:
            word_ids = prompt_token_ids(tokenizer, word, special=False)
            found = find_word_tokens(ids, word_ids)
            if not found:
                raise ValueError(
                    f"{word!r} (token ids {word_ids}) is not in the prompt's tokens {ids}"
                    + (
                        f" = {tokenizer.convert_ids_to_tokens(ids)}"
                        if hasattr(tokenizer, "convert_ids_to_tokens")
                        else ""
                    )
                )
            positions.append(found)
        maps = self.token_maps(normalize="mean" if normalize == "minmax" else normalize,
                               word_tokens=word_tokens, **token_maps_options)  # fmt: skip
        if len(ids) > maps.shape[1]:
            raise ValueError(f"the prompt has {len(ids)} tokens, the traced context {maps.shape[1]}")
        merged = np.stack([maps[:, p].sum(axis=1) if merge == "sum" else maps[:, p].mean(axis=1) for p in positions],
                          axis=1)  # fmt: skip
        return normalize_maps(merged, 1, "minmax") if normalize == "minmax" else merged

    def explorer(
        self,
        batch: int = 0,
        *,
        layers: Any = None,
        image: Any = None,
        tokens: Sequence[str] | None = None,
        prompt: str | None = None,
        tokenizer: Any = None,
        title: str = "Traced attention",
        notes: str = "",
    ) -> Any:
        """The explorer page (:class:`attention_ref.viz.Explorer`) of the traced layers, for sample ``batch``.

        ``tokens``: the context's ``M`` token strings; or give ``prompt`` and ``tokenizer`` (the prompt padded
        to ``M`` tokens as a pipeline does); default ``#0, #1, …``. With ``keep="all"`` the page has one step
        per call, labelled with ``tr.timesteps``. ``image``: any ``(h, w)`` or ``(h, w, 3)`` image in [0, 1]
        or uint8 (e.g. the generated image). Imports :mod:`attention_ref.viz` (matplotlib).
        """
        from ..viz.explorer import Explorer

        chosen = self.select(layers)
        if not chosen:
            raise ValueError("no layer was traced (or chosen)")
        cross = [r for r in chosen if r.kind == "cross"]
        if tokens is None and prompt is not None and cross:
            if tokenizer is None:
                raise ValueError("prompt= needs tokenizer=")
            M = cross[0].keys
            ids = tokenizer(prompt, padding="max_length", max_length=M, truncation=True)["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(list(ids))
        if tokens is None and cross:
            tokens = [f"#{t}" for t in range(cross[0].keys)]
        step_labels = None
        if self.keep == "all":
            counts = {r.calls for r in chosen}
            if len(counts) != 1:
                raise ValueError(
                    f"the chosen layers were called different numbers of times ({sorted(counts)}); choose layers="
                )
            steps = chosen[0].steps
            if len(steps) > 1:
                step_labels = [_step_label(i, self.timesteps[i] if i < len(self.timesteps) else None) for i in steps]
        return Explorer(layers=tuple(r.explorer_layer(batch) for r in chosen), image=image,
                        tokens=None if tokens is None else tuple(tokens), steps=step_labels, title=title,
                        notes=notes)  # fmt: skip

    def summary(self) -> str:
        """One line per traced layer: name, kind, grid, heads, calls, stored bytes."""
        lines = [f"{len(self.layers)} layers, {len(self.timesteps)} model calls, {self.nbytes / 2**20:.2f} MiB kept"]
        width = max((len(r.name) for r in self.layers), default=4)
        for r in self.layers:
            H, W = r.grid
            extra = f", {r.queries} query rows" if r.kind == "self" else f", {r.keys} tokens"
            lines.append(f"  {r.name:<{width}}  {r.kind:<5} {H}×{W}, {r.heads} heads{extra}, {r.calls} calls")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Trace of {type(self.root).__name__}: {len(self.layers)} layers, {len(self.timesteps)} calls>"


def _step_label(index: int, t: Any) -> str:
    if isinstance(t, float):
        return f"t={t:g}"
    return f"call {index}"


def trace(
    model: Any,
    *,
    self_queries: Any = (),
    heads: str = "mean",
    keep: str = "sum",
    dtype: str = "float32",
) -> Trace:
    """Record the attention weights of every diffusers ``Attention`` call inside ``model`` (a context manager).

    Inputs:
        model: a ``UNet2DConditionModel``, a ``Transformer2DModel``, any ``torch.nn.Module`` holding diffusers
            ``Attention`` modules, or a pipeline with ``.unet``.
        self_queries: fractional ``(y, x)`` positions in [0, 1] (``(Q, 2)``, or one pair) whose self-attention
            rows to record at every resolution; ``"all"`` for every row (``N × N``); default none (self-attention
            is not traced).
        heads: ``"mean"`` (default): keep the mean over the heads; ``"all"``: every head.
        keep: ``"sum"`` (default): per layer, the sum over the calls; ``"all"``: every call.
        dtype: ``"float32"`` (default) or ``"float64"``: what the weights are computed in.

    Returns:
        A :class:`Trace`; ``with trace(model) as tr: model(...)`` fills ``tr.layers``.

    Raises:
        NotImplementedError at entry, naming the module, for an ``Attention`` the reference does not express
        (:func:`attention_ref.interop.from_diffusers`); ValueError during the run for a layer whose grid
        cannot be found or whose inputs do not fit.
    """
    return Trace(model, self_queries=self_queries, heads=heads, keep=keep, dtype=dtype)
