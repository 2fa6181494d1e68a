"""A trained (or fresh) diffusion U-Net in one object: parameters, sizes, schedule, and their files.

The shipped weights (``attention_ref/toys/data/diffusion_unet.npz``, float32, with the
training log next to them in ``diffusion_unet.json``) are loaded by :func:`load_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..._files import DEFAULT_MAX_BYTES, atomic_write, load_npz, read_json_object
from .schedule import Schedule, cosine_schedule
from .unet import UNetCache, UNetConfig, init_unet, unet_forward

__all__ = ["DiffusionModel", "PRETRAINED", "load_pretrained", "pretrained_log", "pretrained_path"]

PRETRAINED = "diffusion_unet"  # file stem inside attention_ref/toys/data


@dataclass
class DiffusionModel:
    """A U-Net with its sizes and noise schedule.

    params: name → NumPy array (see :func:`~attention_ref.toys.diffusion.unet.init_unet`).
    config: the :class:`~attention_ref.toys.diffusion.unet.UNetConfig`.
    schedule: the noise schedule it was trained with.
    log: the training log (seed, steps, losses, timings, evaluation), empty for a fresh model.
    """

    params: dict[str, np.ndarray]
    config: UNetConfig
    schedule: Schedule = field(default_factory=cosine_schedule)
    log: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, config: UNetConfig | None = None, *, seed: int = 0, dtype: Any = "float32") -> DiffusionModel:
        """An untrained model (the baseline of the measurements); float32 by default, as training runs."""
        config = config or UNetConfig()
        return cls(init_unet(config, rng=seed, dtype=dtype), config)

    @property
    def dtype(self) -> np.dtype:
        return next(iter(self.params.values())).dtype

    def astype(self, dtype: Any) -> DiffusionModel:
        """The same model with its parameters cast to ``dtype``."""
        return DiffusionModel(
            {k: v.astype(dtype) for k, v in self.params.items()}, self.config, self.schedule, self.log
        )

    def eps(self, x: np.ndarray, t: np.ndarray, context: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, UNetCache]:
        """``ε̂`` ``(B, H, W, 3)`` and the U-Net's cache, in the parameters' dtype."""
        dt = self.dtype
        return unet_forward(
            self.params, x.astype(dt), np.asarray(t).astype(dt), context.astype(dt), mask, config=self.config
        )

    def save(self, path: str | Path) -> Path:
        """Write the parameters and config to ``path`` (``.npz``, added when missing) and the log to the same
        stem ``.json``; returns the ``.npz`` path.

        Each file is written through a temporary file renamed over it
        (:func:`attention_ref._files.atomic_write`): a failure leaves existing files as they were.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # as numpy.savez names it
        log = json.dumps(self.log, indent=1) + "\n"  # serialised first: a log that cannot be written stops here
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.savez_compressed(f, __config__=np.array(json.dumps(self.config.to_dict())), **self.params)
        with atomic_write(path.with_suffix(".json"), "w", encoding="utf-8") as f:
            f.write(log)
        return path

    @classmethod
    def load(cls, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> DiffusionModel:
        """The model :meth:`save` wrote (the log too, when its ``.json`` is there).

        Read by :func:`attention_ref._files.load_npz`: refused before anything is unpacked when the arrays
        would take more than ``max_bytes`` (default 1 GiB), never unpickled. ``ValueError`` naming the file
        and the entry for anything else that is not a saved model: no ``__config__``, a config that is not
        a :class:`~attention_ref.toys.diffusion.unet.UNetConfig`, parameters that are not floating arrays
        of one dtype, a log that is not JSON.
        """
        path = Path(path)
        arrays = load_npz(path, max_bytes=max_bytes)
        config = _config_of(arrays.pop("__config__", None), path)
        if not arrays:
            raise ValueError(f"{path}: holds no parameters")
        dtypes = {a.dtype for a in arrays.values()}
        not_float = sorted(k for k, a in arrays.items() if a.dtype.kind != "f")
        if not_float or len(dtypes) > 1:
            first = not_float[0] if not_float else sorted(arrays)[0]
            raise ValueError(
                f"{path}: parameters must be floating arrays of one dtype; '{first}' is {arrays[first].dtype}"
                + (f" (dtypes found: {sorted(str(d) for d in dtypes)})" if len(dtypes) > 1 else "")
            )
        log_path = path.with_suffix(".json")
        log = {}
        if log_path.exists():
            log = read_json_object(log_path, max_bytes=max_bytes, what="the training log")
        return cls(arrays, config, log=log)


def _config_value_fits(name: str, value: Any) -> bool:
    """Whether a config field read from JSON has its type: lists of ints or bools, or an int."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if name == "channels":
        return isinstance(value, list) and all(is_int(v) for v in value)
    if name.endswith("_attention"):
        return isinstance(value, list) and all(isinstance(v, bool) for v in value)
    return is_int(value)


def json_entry(entry: np.ndarray | None, path: str | Path, name: str, written_by: str) -> Any:
    """The JSON held by the entry ``name`` of a ``.npz`` file (a 0-d string array), parsed.

    ``ValueError`` naming the file and the entry when it is missing (the file is then not ``written_by``, e.g.
    "a model written by DiffusionModel.save"), not a string, or not JSON.
    """
    if entry is None:
        raise ValueError(f"{path}: lacks {name!r} (not {written_by})")
    if entry.dtype.kind != "U" or entry.ndim != 0:
        raise ValueError(f"{path}: {name!r} must be a JSON string, got {entry.dtype} of shape {entry.shape}")
    try:
        return json.loads(str(entry))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {name!r} is not JSON ({err})") from None


def _config_of(entry: np.ndarray | None, path: Path) -> UNetConfig:
    """The :class:`UNetConfig` stored as a JSON string in ``__config__``; ``ValueError`` naming it otherwise."""
    fields = json_entry(entry, path, "__config__", "a model written by DiffusionModel.save")
    known = set(UNetConfig.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else type(fields).__name__
        raise ValueError(f"{path}: '__config__' must be an object with UNetConfig's fields; unknown: {unknown}")
    for name, value in fields.items():
        if not _config_value_fits(name, value):
            raise ValueError(f"{path}: '__config__' field {name!r} has the wrong type: {value!r}")
    try:
        return UNetConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: '__config__': {err}") from None


def _data_file(suffix: str) -> Any:
    return resources.files("attention_ref.toys").joinpath("data", PRETRAINED + suffix)


def pretrained_path() -> Path:
    """Where the shipped weights live (``attention_ref/toys/data/diffusion_unet.npz``), as a file path."""
    return Path(str(_data_file(".npz")))


def load_pretrained(dtype: Any = "float64") -> DiffusionModel:
    """The shipped, trained model (parameters cast to ``dtype``; stored as float32).

    float64 by default: sampling and the evaluation run in the reference's precision (float32 samples
    about twice as fast; the tests use it).
    """
    path = _data_file(".npz")
    if not path.is_file():
        raise FileNotFoundError(
            f"the trained diffusion weights are missing ({path}); train them with "
            "`python -m attention_ref.toys.diffusion.train`"
        )
    with resources.as_file(path) as p:
        return DiffusionModel.load(p).astype(dtype)


def pretrained_log() -> dict[str, Any]:
    """The training log shipped with the weights (loss curve, timings, evaluation)."""
    return json.loads(_data_file(".json").read_text())
