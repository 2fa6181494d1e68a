"""The trace's hooks: attaching to a model, following the running blocks, handing each attention call to its family.

:class:`Trace` attaches forward pre-hooks (with keyword arguments) to the attention modules a family knows
(:mod:`.families`), pre- and post-hooks to the modules that enclose them (to know the map each one runs on),
and a pre-hook to the traced model itself (its timestep and inputs). It replaces no processor and changes no
tensor. Every hook is removed when the ``with`` block ends, also after an exception.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .families import FAMILIES, Family, family_of
from .grids import BlockGrids
from .reading import TraceReading, TraceWarning
from .records import KINDS, LayerFilter, LayerRecord, check_positions, query_pixels

__all__ = ["DTYPES", "HEADS", "KEEP", "Trace", "trace"]

HEADS = ("mean", "all")
KEEP = ("sum", "all")
DTYPES = ("float32", "float64")

# modules whose attention runs along the frames of a video: (B·H·W, F, C) tokens, one sequence per pixel
TEMPORAL_CONTAINERS = frozenset(
    {
        "TemporalBasicTransformerBlock",  # SVD's temporal blocks
        "TransformerTemporalModel",  # UNet3DConditionModel's temp_attentions, AnimateDiff's older motion modules
        "AnimateDiffTransformer3D",  # AnimateDiff's motion modules
        "I2VGenXLTransformerTemporalEncoder",
    }
)


def _root_module(model: Any) -> Any:
    """The ``torch.nn.Module`` to trace: the model itself, or a pipeline's ``.unet`` or ``.transformer``."""
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    held = {a: getattr(model, a, None) for a in ("transformer", "unet")}
    held = {a: m for a, m in held.items() if isinstance(m, torch.nn.Module)}
    if len(held) == 1:
        return next(iter(held.values()))
    if len(held) > 1:
        raise TypeError(f"{type(model).__name__} holds both .unet and .transformer: trace one of them")
    raise TypeError(
        f"trace needs a torch.nn.Module holding attention modules or a pipeline with .unet or .transformer; "
        f"got {type(model).__name__}"
    )


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


class Trace(TraceReading, BlockGrids):
    """The attention weights of a model's attention modules during a run (:mod:`attention_ref.interop.trace`).

    Made by ``trace(model, ...)`` (the same class) and used as a context manager. After the ``with`` block:

    * ``tr.layers``: one :class:`LayerRecord` per traced map (a module, or a part of one), in the order of
      their first call;
    * ``tr.timesteps``: the ``timestep`` of each call of the traced model (``None`` where it had none);
    * ``tr.skipped``: ``{module path: why it was not traced}``;
    * :meth:`token_maps`, :meth:`word_maps`: aggregated cross-attention and joint maps;
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
        layers: Any = None,
        verify: bool = False,
    ) -> None:
        """Record the attention weights of every attention call inside ``model`` (a context manager).

        Inputs:
            model: a ``UNet2DConditionModel``, a transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
                ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``, ``SanaTransformer2DModel``,
                ``WanTransformer3DModel``, ``Transformer2DModel``), a video U-Net (``UNetSpatioTemporalConditionModel``,
                ``UNetMotionModel``), a VAE, any ``torch.nn.Module`` holding such attention modules, or a pipeline
                with ``.unet`` or ``.transformer``.
            self_queries: fractional ``(y, x)`` positions in [0, 1] (``(Q, 2)``, or one pair) whose self-attention
                (and temporal) rows to record at every resolution; ``"all"`` for every row (``N × N``); default none
                (self-attention is not traced).
            heads: ``"mean"`` (default): keep the mean over the heads; ``"all"``: every head.
            keep: ``"sum"`` (default): per layer, the sum over the calls; ``"all"``: every call.
            dtype: ``"float32"`` (default) or ``"float64"``: what the weights are computed in.
            layers: which modules to trace: a module path, a glob on the paths (``"transformer_blocks.1*"``), a kind
                (``"self"``, ``"cross"``, ``"joint"``, ``"temporal"``), a list of these, or a predicate
                ``(name, kind) -> bool``; default every module (self and temporal rows only with ``self_queries``).
            verify: also compare each traced call's output, recomputed by the reference, with the module's real
                output (``check_model``'s rule); a layer whose processor does not compute the standard weights
                (prompt-to-prompt, PAG, …) is marked ``edited`` (slow: the whole attention of each call is recomputed
                in float64 on the host).

        After the run:
            ``with trace(model) as tr: model(...)`` fills ``tr.layers``. A run that recorded no
            layer warns (:class:`TraceWarning`) saying which layers were called and why none was kept.

        Raises:
            NotImplementedError at entry, naming the module, for an attention module the reference does not express;
            ValueError at entry for a ``layers=`` glob that matches no module, and during the run for a layer whose
            grid cannot be found or whose inputs do not fit.
        """
        if heads not in HEADS:
            raise ValueError(f"heads must be one of {list(HEADS)}, got {heads!r}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {list(KEEP)}, got {keep!r}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.model = model
        self.root = _root_module(model)
        self.positions = check_positions(self_queries)
        self.heads = heads
        self.keep = keep
        self.dtype = np.dtype(str(dtype))
        self.filter = LayerFilter(layers)
        self.verify = bool(verify)
        self.layers: list[LayerRecord] = []
        self.timesteps: list[Any] = []
        self.skipped: dict[str, str] = {}
        self.model_inputs: dict[str, Any] = {}  # the traced model's current call's inputs by name (Flux: img_ids)
        self.family_state: dict[str, Any] = {}  # what a family keeps between calls (Flux: the grid of img_ids)
        self._records: dict[str, LayerRecord] = {}
        self._handles: list[Any] = []
        self._stack: list[tuple[str, tuple[int, ...] | None, tuple[Any, ...]]] = []
        self._params: dict[Any, tuple[tuple[Any, ...], Any]] = {}
        self._families: dict[str, Family] = {}
        self._temporal: set[str] = set()
        self._seen: dict[str, str] = {}  # module path → the kind of its calls, traced or not
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
        modules = dict(self.root.named_modules())
        found = [(n, m, family_of(m)) for n, m in modules.items()]
        attentions = [(n, m, f) for n, m, f in found if f is not None]
        if not attentions:
            others = sorted({type(m).__name__ for n, m in modules.items() if type(m).__name__.endswith("Attention")})
            hint = f" (it holds {others}, which the trace does not know)" if others else ""
            known = sorted({f.module for f in FAMILIES} - {"Attention"})
            also = f" (nor {', '.join(known)})" if known else ""
            raise ValueError(f"{type(self.root).__name__} holds no diffusers Attention module{also}{hint}")
        names = [n for n, _, _ in attentions]
        for n, _, _ in attentions:
            parts = n.split(".")
            if any(type(modules[".".join(parts[:i])]).__name__ in TEMPORAL_CONTAINERS for i in range(len(parts))):
                self._temporal.add(n)
        unmatched = self.filter.unmatched_globs(names)
        if unmatched:
            raise ValueError(
                f"layers={self.filter.spec!r}: {unmatched} match no attention module of {type(self.root).__name__} "
                f"(kinds are {list(KINDS)}; the modules are e.g. {names[:4]})"
            )
        if self.positions is None and self.filter.kinds & {"self", "temporal"}:
            picked = sorted(self.filter.kinds & {"self", "temporal"})
            raise ValueError(f"layers={self.filter.spec!r} asks for {picked} rows: give self_queries= (the query "
                             "pixels' positions, or 'all')")  # fmt: skip
        chosen = []
        for name, module, family in attentions:
            kinds = family.static_kinds(module, name in self._temporal)
            if self.filter.predicate is None and not any(self.filter(name, kind) for kind in kinds):
                self.skipped[name] = f"not chosen by {self.filter!r} (a {' and '.join(kinds)} layer)"
                continue
            try:  # refuse what the reference cannot express before attaching anything
                self.params(name, module, family)
            except NotImplementedError as err:
                raise NotImplementedError(
                    f"{name or type(module).__name__}: {err} (leave it out with layers=)"
                ) from None
            chosen.append((name, module, family))
            self._families[name] = family
        enclosing = sorted({n.rsplit(".", 1)[0] if "." in n else "" for n, _, _ in chosen} - set(names))
        ancestors: set[str] = set()
        for n in enclosing:
            parts = n.split(".") if n else []
            ancestors.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        ancestors -= set(names)
        try:
            self._handles.append(self.root.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for n in sorted(ancestors):
                m = modules[n]
                self._handles.append(m.register_forward_pre_hook(self._enter_block(n, m), with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._leave_block(n), always_call=True))
            for n, m, _ in chosen:
                self._handles.append(m.register_forward_pre_hook(self._on_attention(n), with_kwargs=True))
                if self.verify:
                    self._handles.append(m.register_forward_hook(self._on_attention_output(n), with_kwargs=True))
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._detach()
        if exc_type is None and not self.layers:
            warnings.warn(self._why_nothing(), TraceWarning, stacklevel=2)

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    def _why_nothing(self) -> str:
        """The message of a trace that recorded no layer: what was called, and why none of it was kept."""
        root = type(self.root).__name__
        if not self.timesteps:
            return f"the trace of {root} recorded nothing: the model was not called inside the with block"
        if not self._seen:
            return f"the trace of {root} recorded nothing: none of the chosen attention modules was called"
        counts: dict[str, int] = {}
        for kind in self._seen.values():
            counts[kind] = counts.get(kind, 0) + 1
        called = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        why = []
        if self.positions is None and {"self", "temporal"} & set(counts):
            why.append("self-attention and temporal rows are traced only for the query pixels of self_queries=")
        if not self.filter.everything:
            why.append(f"{self.filter!r} chose none of the called layers")
        reason = "; ".join(why) or "no call gave maps"
        return (
            f"the trace of {root} recorded no layer: {len(self._seen)} attention layers were called ({called}); "
            f"{reason}"
        )

    # ----- the hooks --------------------------------------------------------------------------------------
    def _on_model_call(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep")
        if t is None and len(args) > 1 and self._timestep_second:
            t = args[1]
        self.timesteps.append(_timestep_value(t))
        try:
            self.model_inputs = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        except TypeError:
            self.model_inputs = dict(kwargs)
        for family in {id(f): f for f in self._families.values()}.values():
            family.on_model_call(self, args, kwargs)

    def _on_attention(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._families[name].record(self, name, module, args, kwargs)

        return hook

    def _on_attention_output(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if any(r.name == name for r in self.layers):  # a traced call (the kinds not traced are not judged)
                self._families[name].verify(self, name, module, args, kwargs, output)

        return hook

    # ----- what the families use ---------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype.name)

    def params(self, key: Any, module: Any, family: Family | None = None, loader: Any = None) -> Any:
        """The module's parameters read by the family's loader in the trace's dtype, as tensors on its device.

        Read again only when a parameter changed (its storage, version counter, dtype or device). ``key``
        names the cache entry (a module path; a family keeps a processor's weights under its own key).
        """
        import torch

        parameters = list(module.parameters())
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in parameters)
        cached = self._params.get(key)
        if cached is None or cached[0] != stamp:
            load = loader if loader is not None else family.load
            params, options = load(module, self.dtype)
            device = parameters[0].device if parameters else "cpu"
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in params.items()}
            cached = (stamp, (tensors, options))
            self._params[key] = cached
        return cached[1]

    def is_temporal(self, name: str) -> bool:
        """The module runs along the frames of a video (it sits in a temporal block)."""
        return name in self._temporal

    def wants(self, name: str, kind: str) -> bool:
        """Whether a call of ``kind`` of the module at ``name`` is recorded (``layers=``, ``self_queries``)."""
        self._seen.setdefault(name, kind)
        if kind in ("self", "temporal") and self.positions is None:
            self.skipped.setdefault(name, f"{kind} attention: traced only with self_queries=")
            return False
        if not self.filter(name, kind):
            self.skipped.setdefault(name, f"not chosen by {self.filter!r} (a {kind} layer)")
            return False
        return True

    def head_reduce(self, p: Any) -> Any:
        """``(B, heads, R, K)`` → ``(B, R, K)`` (the mean over the heads) with ``heads="mean"``; else unchanged."""
        return p.mean(dim=1) if self.heads == "mean" else p

    def query_rows(self, grid: tuple[int, int], device: Any) -> tuple[np.ndarray | None, Any]:
        """The query pixels ``(Q, 2)`` of ``self_queries`` on ``grid`` and their tokens ``row·W + col`` (a tensor);
        ``(None, None)`` for every row."""
        import torch

        if not isinstance(self.positions, np.ndarray):
            return None, None
        pixels = query_pixels(self.positions, grid)
        return pixels, torch.from_numpy(pixels[:, 0] * grid[1] + pixels[:, 1]).to(device)

    def add(
        self,
        name: str,
        kind: str,
        grid: tuple[int, int],
        maps: Any,
        *,
        heads: int,
        keys: int,
        part: str | None = None,
        pixels: np.ndarray | None = None,
        frames: int | None = None,
        note: str = "",
    ) -> None:
        """Add one call's maps (already in the record's shape, heads reduced as asked) to the record."""
        label = name if part is None else f"{name}[{part}]"
        record = self._records.get(label)
        if record is None:
            record = LayerRecord(name=name, kind=kind, grid=grid, heads=heads, keys=keys, batch=int(maps.shape[0]),
                                 head_mean=self.heads == "mean", keep=self.keep, query_pixels=pixels, part=part,
                                 frames=frames, note=note)  # fmt: skip
            self._records[label] = record
            self.layers.append(record)
        elif record.kind != kind or record.grid != grid:
            raise ValueError(
                f"{label}: called as {kind}-attention at {grid}, earlier as {record.kind} at {record.grid}"
            )
        elif note and note not in record.note:
            record.note = f"{record.note}; {note}" if record.note else note
        record._add(maps, max(len(self.timesteps) - 1, 0))

    def note(self, name: str, text: str) -> None:
        """A remark on a module that is not a record's (a part not traced): kept in ``skipped``."""
        self.skipped.setdefault(name, text)

    def mark(self, name: str, ratio: float, edited: bool, why: str) -> None:
        """``verify``'s verdict on one call of the module at ``name``: onto each of its records."""
        for record in self.layers:
            if record.name == name:
                record._mark(ratio, edited, why)

    def __repr__(self) -> str:
        return f"<Trace of {type(self.root).__name__}: {len(self.layers)} layers, {len(self.timesteps)} calls>"


#: ``with trace(model) as tr:`` — :class:`Trace` itself, under the name a ``with`` statement reads best with.
trace = Trace
