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
        """Write the parameters and config to ``path`` (``.npz``) and the log to the same stem ``.json``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, __config__=np.array(json.dumps(self.config.to_dict())), **self.params)
        path.with_suffix(".json").write_text(json.dumps(self.log, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DiffusionModel:
        """The model :meth:`save` wrote (the log too, when its ``.json`` is there)."""
        path = Path(path)
        with np.load(path) as f:
            config = UNetConfig.from_dict(json.loads(str(f["__config__"])))
            params = {k: f[k] for k in f.files if k != "__config__"}
        log_path = path.with_suffix(".json")
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        return cls(params, config, log=log)


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
