"""The battery: named attention problems that break implementations.

A :class:`Case` holds one problem in float64 — ``q, k, v``, the upstream
gradient ``dout``, an optional boolean ``mask`` (True = may attend), an optional
additive ``bias`` and an optional ``scale`` (``None`` means the implementation's
default, which must be ``1/sqrt(d)``). The harness rounds the arrays to the dtype
under test; the float64 reference is computed from those rounded values, so
rounding the inputs is never counted against an implementation.

:func:`battery` builds the default cases, deterministically (each case has its
own fixed seed). They cover:

* sizes: N = 1, M = 1, d = 1, odd sizes, sizes one past a power of two (tile
  edges of blocked kernels), N ≠ M (77 text tokens), d ≠ dv, batch and head dims,
  no leading dims at all;
* masks: none, random, key padding (broadcast), causal (N = M, and N < M in both
  alignments of :func:`attention_ref.causal_mask`: top-left as PyTorch's ``is_causal``,
  bottom-right as FlashAttention ≥ 2.1's ``causal=True``), sliding window, fully masked
  query rows;
* additive bias, full and broadcast; custom scale, and ``scale = 0`` (not "the default");
* logits: large (|scale·q·k| in the hundreds, which overflows ``exp`` without
  max subtraction), near-uniform weights, near-one-hot weights; duplicate keys;
* a long sequence (1024 keys) whose values share a common component, which
  exposes sums over the keys accumulated in the low-precision dtype; 4096 keys (the
  tokens of Stable Diffusion's first level, a 64×64 latent) with values of non-zero
  mean, where a softmax sum ``ℓ`` or a ``P·V`` sum kept in float16 or bfloat16 stalls;
  and a long query axis (1024 queries, 64 keys) whose upstream gradient shares a
  common component, which exposes the backward's sums over the queries
  (``dV = Pᵀ dO``) accumulated so.

Add your own with ``Case(name, q, k, v, mask=..., bias=..., scale=...)``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..attention.inputs import check_attention_inputs
from ..attention.masks import causal_mask

__all__ = ["CASE_NAMES", "CORE_CASES", "FEATURES", "RECIPES", "Case", "battery", "reseeded", "select_cases"]

# What a case may exercise (:attr:`Case.features`); an implementation declares the ones it does not support.
FEATURES = ("d != dv", "N != M", "custom scale", "mask", "bias", "fully masked rows")


@dataclass(frozen=True, eq=False)
class Case:
    """One attention problem, in float64.

    Attributes:
        name: short unique name, shown in reports and used as the vector file name.
        q: ``(..., N, d)``; k: ``(..., M, d)``; v: ``(..., M, dv)``.
        mask: boolean, broadcastable to ``(..., N, M)``, or ``None``.
        bias: float, broadcastable to ``(..., N, M)``, or ``None``.
        scale: a number, or ``None`` for the implementation's default ``1/sqrt(d)``.
        dout: ``(..., N, dv)``, the upstream gradient; random (seeded by the name) when not given.
        description: what the case is for.
    """

    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: float | None = None
    dout: np.ndarray | None = None
    description: str = field(default="")

    def __post_init__(self) -> None:
        as64 = {n: np.asarray(getattr(self, n), dtype=np.float64) for n in ("q", "k", "v")}
        if self.bias is not None:
            as64["bias"] = np.asarray(self.bias, dtype=np.float64)
        if self.mask is not None:
            as64["mask"] = np.asarray(self.mask)
        for name, a in as64.items():
            object.__setattr__(self, name, a)
        check_attention_inputs(self.q, self.k, self.v, self.mask, self.bias, self.scale)
        empty = [n for n in ("q", "k", "v") if getattr(self, n).size == 0]
        if empty:
            raise ValueError(
                f"case {self.name!r}: {', '.join(empty)} of shape "
                f"{', '.join(str(getattr(self, n).shape) for n in empty)} has no entries: nothing would be compared"
            )
        out_shape = (*self.q.shape[:-1], self.v.shape[-1])
        if self.dout is None:
            rng = np.random.default_rng(_seed(self.name + "/dout"))
            object.__setattr__(self, "dout", rng.standard_normal(out_shape))
        else:
            dout = np.asarray(self.dout, dtype=np.float64)
            if dout.shape != out_shape:
                raise ValueError(
                    f"case {self.name!r}: dout of shape {dout.shape} does not match the output {out_shape}"
                )
            object.__setattr__(self, "dout", dout)
        for n in ("q", "k", "v", "dout", "bias"):
            a = getattr(self, n)
            if a is None:
                continue
            finite = np.isfinite(a) if n != "bias" else np.isfinite(a) | (a == -np.inf)  # a bias may drop keys
            if not np.all(finite):
                raise ValueError(
                    f"case {self.name!r}: {n} holds NaN or Inf; non-finite inputs are the case's error, not the "
                    "implementation's (a bias may hold -inf to drop a key)"
                )

    @property
    def dead_rows(self) -> np.ndarray:
        """Boolean ``(..., N)``: query rows with no allowed key (their output must be 0): every key masked, or
        given a bias of ``-inf``."""
        rows = (*self.q.shape[:-1],)
        logits = (*rows, self.k.shape[-2])
        allowed = np.ones(logits, dtype=bool)
        if self.mask is not None:
            allowed = allowed & np.broadcast_to(self.mask, logits)
        if self.bias is not None:
            allowed = allowed & np.broadcast_to(self.bias != -np.inf, logits)
        return ~np.any(allowed, axis=-1)

    @property
    def features(self) -> frozenset[str]:
        """What the case exercises, from :data:`FEATURES`; an implementation may declare some unsupported.

        ``"d != dv"`` (value width differs from key width), ``"N != M"`` (queries and keys differ in number),
        ``"custom scale"`` (``scale`` given), ``"mask"``, ``"bias"``, ``"fully masked rows"`` (a query row with
        no allowed key).
        """
        found = set()
        if self.q.shape[-1] != self.v.shape[-1]:
            found.add("d != dv")
        if self.q.shape[-2] != self.k.shape[-2]:
            found.add("N != M")
        if self.scale is not None:
            found.add("custom scale")
        if self.mask is not None:
            found.add("mask")
        if self.bias is not None:
            found.add("bias")
        if self.dead_rows.any():
            found.add("fully masked rows")
        return frozenset(found)

    def shapes(self) -> dict[str, Any]:
        """Shapes of every array (``None`` for an absent mask or bias)."""
        return {
            n: None if getattr(self, n) is None else tuple(getattr(self, n).shape)
            for n in ("q", "k", "v", "mask", "bias", "dout")
        }


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _make(
    name: str,
    description: str,
    lead: tuple[int, ...],
    N: int,
    M: int,
    d: int,
    dv: int,
    *,
    qk_std: float = 1.0,
    scale: float | None = None,
    mask: str | None = None,
    bias: str | None = None,
    seed: int | None = None,
) -> Case:
    """A random case; ``mask`` / ``bias`` name a pattern (see the code), ``qk_std`` sets the logit size.

    ``seed``: ``None`` for the battery's own numbers (seeded by the name), or another draw of the same recipe.
    """
    rng = np.random.default_rng(_seed(name) if seed is None else [_seed(name), seed])
    q = qk_std * rng.standard_normal((*lead, N, d))
    k = qk_std * rng.standard_normal((*lead, M, d))
    v = rng.standard_normal((*lead, M, dv))
    i = np.arange(N)[:, None]  # query index, (N, 1)
    j = np.arange(M)[None, :]  # key index, (1, M)
    m = None
    if mask == "random":  # about a third of the entries off, every row keeps one key
        m = rng.random((*lead, N, M)) > 0.35
        m[..., np.arange(N), np.arange(N) % M] = True
    elif mask == "key padding":  # per batch element: the last keys are padding, (B, 1, 1, M)
        lengths = np.array([M, M - 3, 1][: lead[0]])
        m = (np.arange(M) < lengths[:, None])[:, None, None, :]
    elif mask in ("causal", "causal top_left", "causal bottom_right"):  # query i sees keys j ≤ i (+ M − N), (N, M)
        m = causal_mask(N, M, "bottom_right" if mask.endswith("bottom_right") else "top_left")
    elif mask == "window":  # query i sees keys within 2 positions, (N, M)
        m = np.abs(i - j) <= 2
    elif mask == "fully masked rows":  # random, plus rows 1 and N-1 with no key at all
        m = rng.random((*lead, N, M)) > 0.35
        m[..., 0, 0] = True
        m[..., 1, :] = False
        m[..., N - 1, :] = False
    elif mask is not None:
        raise ValueError(mask)
    b = None
    if bias == "full":
        b = rng.standard_normal((*lead, N, M))
    elif bias == "broadcast":  # a relative-position bias shared over the batch, (heads, N, M)
        b = -0.5 * np.abs(i - j) * (1.0 + np.arange(lead[-1]))[:, None, None]
    elif bias is not None:
        raise ValueError(bias)
    return Case(name, q, k, v, mask=m, bias=b, scale=scale, description=description)


def _changed(base: Case, description: str, **arrays: np.ndarray) -> Case:
    """``base`` (a plain :func:`_make` case: no mask, bias or scale) with some of ``k``, ``v``, ``dout`` replaced
    and a description; its ``dout`` drawn again from the name unless given."""
    k, v = arrays.get("k", base.k), arrays.get("v", base.v)
    return Case(base.name, base.q, k, v, dout=arrays.get("dout"), description=description)


def _duplicate_keys() -> Case:
    base = _make("duplicate keys", "", (2,), 6, 8, 8, 8)
    k, v = base.k.copy(), base.v.copy()
    k[..., 5, :] = k[..., 2, :]  # keys 2 and 5 identical, values differ: equal weights
    k[..., 7, :] = k[..., 2, :]
    v[..., 3, :] = v[..., 0, :]
    k[..., 3, :] = k[..., 0, :]  # key 3 duplicates key 0 with the same value
    return _changed(base, "identical keys (some with identical values): tied weights", k=k, v=v)


def _long_sequence(seed: int | None = None, d: int = 8, dv: int = 8) -> Case:
    base = _make("long sequence", "", (1,), 4, 1024, d, dv, qk_std=0.5, seed=seed)
    v = 2.0 + base.v  # a common component: sums of 1024 small terms onto ~2 lose digits in low precision
    return _changed(base, "1024 keys, values of mean 2: exposes accumulation in the low-precision dtype", v=v)


def _sd_first_level() -> Case:
    base = _make("4096 keys", "", (1,), 4, 4096, 16, 16, qk_std=0.5)
    v = 1.5 + base.v  # non-zero mean: every P·V sum grows to ~1.5 from terms ~1/4096 of it
    return _changed(base, "4096 keys (a 64×64 latent), values of mean 1.5: a narrow ℓ or P·V sum stalls", v=v)


def _long_query_axis() -> Case:
    base = _make("long query axis", "", (1,), 1024, 64, 8, 8, qk_std=0.5)
    rng = np.random.default_rng(_seed("long query axis/dout"))
    dout = 1.0 + rng.standard_normal((*base.q.shape[:-1], 8))  # a common component: Σ_i P_ij dO_i grows to ~16
    return _changed(
        base, "1024 queries, 64 keys, dout of mean 1: exposes dK, dV accumulated over queries in the dtype", dout=dout
    )


def _large_logits(seed: int | None = None, d: int = 16, dv: int = 16) -> Case:
    return _make(
        "large logits",
        "|scale·q·k| in the hundreds: exp overflows without max subtraction",
        (2,),
        9,
        10,
        d,
        dv,
        qk_std=14.0,
        seed=seed,
    )


# The recipes that :func:`reseeded` draws again: the two whose rounding error is the most sensitive to the data
# (large logits: a few dominant weights; long sequence: sums over 1024 keys).
RECIPES = {"large logits": _large_logits, "long sequence": _long_sequence}


def reseeded(name: str, seed: int, d: int | None = None) -> Case:
    """Another draw of the battery's recipe ``name`` (one of :data:`RECIPES`), with head width ``d`` (= dv).

    The battery's own case is ``seed=None``; any integer gives new numbers with the same sizes and statistics.
    Used to check that the tolerance holds on more than the battery's one draw.
    """
    if name not in RECIPES:
        raise ValueError(f"no recipe named {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name](seed, *(() if d is None else (d, d)))


def battery() -> list[Case]:
    """The default cases, in a fixed order; every call builds the same arrays."""
    B, H = 2, 3
    cases = [
        _make("plain", "self-attention, 8 tokens, d = 16", (B,), 8, 8, 16, 16),
        _make("N=1", "a single query", (B,), 1, 7, 8, 8),
        _make("M=1", "a single key: every weight is 1", (B,), 6, 1, 8, 8),
        _make("d=1", "one feature per head", (B,), 5, 6, 1, 1),
        _make("odd sizes", "N, M, d, dv all odd", (1,), 37, 53, 13, 11),
        _make("tile edges", "N, M one past a power of two: a partial last tile", (1,), 33, 129, 16, 16),
        _make("cross-attention", "64 pixels attend to 77 text tokens", (B,), 64, 77, 8, 8),
        _make("d!=dv", "value width differs from key width", (B,), 9, 10, 12, 5),
        _make("batch and heads", "(batch, heads, N, d)", (B, H), 10, 12, 8, 8),
        _make("no leading dims", "plain (N, d) arrays", (), 6, 5, 4, 4),
        _make("random mask", "a third of the entries masked", (B, H), 9, 11, 8, 8, mask="random"),
        _make("key padding", "padding keys, mask (B, 1, 1, M)", (B, H), 7, 10, 8, 8, mask="key padding"),
        _make("causal", "lower-triangular mask (N, N)", (B, H), 12, 12, 8, 8, mask="causal"),
        _make(
            "causal top-left N<M",
            "10 queries, 16 keys: query i sees keys j ≤ i (PyTorch's is_causal)",
            (B, H),
            10,
            16,
            8,
            8,
            mask="causal top_left",
        ),
        _make(
            "causal bottom-right N<M",
            "10 queries, 16 keys: query i sees keys j ≤ i + 6 (FlashAttention ≥ 2.1's causal)",
            (B, H),
            10,
            16,
            8,
            8,
            mask="causal bottom_right",
        ),
        _make("window", "sliding window |i - j| ≤ 2", (B,), 11, 11, 8, 8, mask="window"),
        _make("fully masked rows", "two query rows with no key: output 0", (B,), 8, 9, 8, 8, mask="fully masked rows"),
        _make("bias", "additive bias on the logits", (B,), 8, 9, 8, 8, bias="full"),
        _make("broadcast bias", "relative-position bias (heads, N, M)", (B, H), 8, 8, 8, 8, bias="broadcast"),
        _make(
            "mask+bias+scale",
            "everything at once, with fully masked rows",
            (B, H),
            8,
            9,
            8,
            6,
            scale=0.3,
            mask="fully masked rows",
            bias="full",
        ),
        _make("custom scale", "scale 2.5 instead of 1/sqrt(d)", (B,), 7, 9, 8, 8, scale=2.5),
        _make("scale=0", "scale 0: uniform weights, dq = dk = 0 (not the default scale)", (B,), 7, 9, 8, 8, scale=0.0),
        _large_logits(),
        _make(
            "large logits masked",
            "large logits with key padding",
            (B, 1),
            9,
            10,
            16,
            16,
            qk_std=14.0,
            mask="key padding",
        ),
        _make("near-uniform", "logits ~1e-4: weights all ≈ 1/M", (B,), 8, 40, 16, 8, qk_std=0.01),
        _make("near-one-hot", "logits ~10: one weight ≈ 1, the rest small", (B,), 8, 12, 16, 8, qk_std=3.0),
        _duplicate_keys(),
        _long_sequence(),
        _sd_first_level(),
        _long_query_axis(),
    ]
    return cases


CASE_NAMES: tuple[str, ...] = tuple(c.name for c in battery())

# Where kernels break, grouped: a check whose selected cases of a group all went unrun (declared unsupported) is not
# ok unless the caller accepts that group's absence by name (check_attention's missing_ok).
CORE_CASES: dict[str, tuple[str, ...]] = {
    "long sequence": ("long sequence", "4096 keys", "long query axis"),
    "large logits": ("large logits", "large logits masked"),
    "masks": (
        "random mask",
        "key padding",
        "causal",
        "causal top-left N<M",
        "causal bottom-right N<M",
        "window",
        "fully masked rows",
    ),
}


def select_cases(cases: Any = None) -> list[Case]:
    """Resolve ``cases``: ``None`` (the battery), names from the battery, :class:`Case` objects, or a mix.

    ``ValueError`` for an empty list (nothing would be checked), an unknown name (the message lists the
    battery's names) or a name given twice.
    """
    if cases is None:
        return battery()
    if isinstance(cases, (str, Case)):
        cases = [cases]
    cases = list(cases)
    if not cases:
        raise ValueError(f"no cases given: nothing would be checked; the battery has: {', '.join(CASE_NAMES)}")
    by_name = {c.name: c for c in battery()} if any(isinstance(c, str) for c in cases) else {}
    chosen = []
    for c in cases:
        if isinstance(c, Case):
            chosen.append(c)
        elif isinstance(c, str):
            if c not in by_name:
                raise ValueError(f"no case named {c!r}; the battery has: {', '.join(by_name)}")
            chosen.append(by_name[c])
        else:
            raise TypeError(f"cases must be names or Case objects, got {type(c).__name__}")
    names = [c.name for c in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    return chosen
