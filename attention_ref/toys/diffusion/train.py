r"""Training the diffusion toy: the DDPM ε-prediction loss, the library's backward passes, Adam.

One step, for a batch of fresh scenes (:mod:`~attention_ref.toys.diffusion.data`):

1. draw ``t`` uniform in ``[0, T)`` and ``ε ~ N(0, I)``; noise the images:
   ``x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε``;
2. replace each prompt by the empty one (``<sot> <eot>``) with probability ``uncond``,
   so that the same network also learns ``ε̂_∅`` for classifier-free guidance;
3. ``ε̂, cache = unet_forward(...)``; ``L = mean (ε̂ − ε)²``;
4. ``grads = unet_backward(2 (ε̂ − ε)/n, cache)``, clipped to a global norm of ``clip``;
5. an Adam step; the learning rate rises linearly over ``warmup`` steps and then stays
   constant, so a run of ``N`` steps is the first ``N`` steps of any longer run with the same seed;
6. an exponential moving average of the parameters is kept and is what the function returns
   — the usual practice for diffusion models. Its decay after ``n`` steps is
   ``min(ema, (1 + n)/(10 + n))``, so the early average forgets the initial parameters quickly.

The command line trains the shipped weights::

    python -m attention_ref.toys.diffusion.train --seed 0 --steps STEPS --out attention_ref/toys/data/diffusion_unet.npz

(``--help`` lists the options; the defaults are the shipped model's, and ``docs/diffusion.md``
gives the command and the time it took).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...backend import cpu_model, limited_threads
from .._progress import progress as progress_bar
from .._progress import toy_threads
from ..adam import Adam
from .data import EMPTY_PROMPT, encode_prompts, make_diffusion_scenes, to_model
from .evaluate import evaluate_model
from .model import DiffusionModel
from .schedule import T, cosine_schedule, noise_images
from .unet import UNetConfig, init_unet, unet_backward, unet_forward

__all__ = ["SHIPPED", "diffusion_loss", "retrain_shipped", "train_diffusion", "training_step"]

# the run that made the shipped weights: `python -m attention_ref.toys.diffusion.train --seed 0 --steps STEPS`
SHIPPED = {"seed": 0, "steps": 12000}
DEFAULTS = {"batch": 32, "lr": 1e-3, "warmup": 500, "ema": 0.999, "uncond": 0.1, "clip": 1.0, "dtype": "float32"}


def diffusion_loss(eps_hat: np.ndarray, eps: np.ndarray) -> tuple[float, np.ndarray]:
    """``L = mean (ε̂ − ε)²`` and ``∂L/∂ε̂ = 2 (ε̂ − ε)/n``."""
    err = eps_hat - eps
    return float(np.mean(err.astype(np.float64) ** 2)), 2.0 * err / err.size


def training_step(
    params: dict[str, np.ndarray],
    config: UNetConfig,
    schedule: Any,
    rng: np.random.Generator,
    *,
    batch: int,
    uncond: float,
) -> tuple[float, dict[str, np.ndarray], dict[str, Any]]:
    """One forward and backward pass on fresh data (steps 1–4 of the module docstring, without clipping).

    Returns:
        ``(loss, grads, parts)`` where ``parts`` holds the batch's arrays (``x0``, ``t``, ``eps``, ``x_t``,
        ``context``, ``mask``, ``eps_hat``) and the U-Net's ``cache``, for inspection.
    """
    dtype = next(iter(params.values())).dtype
    scenes = make_diffusion_scenes(rng, batch)
    x0 = to_model(scenes.images).astype(dtype)  # (B, 16, 16, 3) in [−1, 1]
    t = rng.integers(0, schedule.steps, size=batch)  # (B,)
    eps = rng.standard_normal(x0.shape).astype(dtype)
    x_t = noise_images(schedule, x0, t, eps)
    prompts = [" ".join(scenes.prompt(b)[1 : scenes.lengths[b] - 1]) for b in range(batch)]
    drop = rng.random(batch) < uncond
    context, mask, _ = encode_prompts([EMPTY_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)])
    eps_hat, cache = unet_forward(params, x_t, t.astype(dtype), context.astype(dtype), mask, config=config)
    loss, deps = diffusion_loss(eps_hat, eps)
    grads = unet_backward(deps, cache)
    parts = {"x0": x0, "t": t, "eps": eps, "x_t": x_t, "context": context, "mask": mask, "eps_hat": eps_hat}
    parts["cache"] = cache
    parts["prompts"] = [EMPTY_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)]
    return loss, {k: v for k, v in grads.items() if k in params}, parts


def _clip(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale ``grads`` in place to a global L2 norm of at most ``max_norm``; return the norm before."""
    norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def train_diffusion(
    seed: int = 0,
    *,
    steps: int = SHIPPED["steps"],
    batch: int = DEFAULTS["batch"],
    lr: float = DEFAULTS["lr"],
    warmup: int = DEFAULTS["warmup"],
    ema: float = DEFAULTS["ema"],
    uncond: float = DEFAULTS["uncond"],
    clip: float = DEFAULTS["clip"],
    config: UNetConfig | None = None,
    dtype: Any = DEFAULTS["dtype"],
    progress: bool | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 50,
    threads: int | None = None,
) -> DiffusionModel:
    """Train the diffusion U-Net on scenes of one or two objects (module docstring).

    Inputs:
        seed: initialisation, data, noise and prompt dropping all follow from it.
        steps, batch: Adam steps and scenes per step.
        lr, warmup: the learning rate after a linear warm-up of ``warmup`` steps.
        ema: decay of the parameters' moving average (the returned parameters).
        uncond: probability of training a scene with the empty prompt.
        clip: largest global gradient norm.
        config: the U-Net's sizes (default :class:`UNetConfig`).
        dtype: of the parameters and activations during training.
        progress: a tqdm bar (``None``: only in a terminal or a notebook).
        checkpoint: if given, the EMA model is saved there every ``checkpoint_every`` steps (and at the end);
            a ``{step}`` in the path is replaced by the step count (one file per checkpoint).
        log_every: the log keeps the mean loss of every ``log_every`` steps.
        threads: attention_ref's and BLAS's threads while training; default ``ATTENTION_REF_NUM_THREADS``
            when set, else 1 (:func:`attention_ref.toys.toy_threads`: the maps are small).

    Returns:
        :class:`DiffusionModel` with the EMA parameters and ``log``: the settings, the mean loss per
        ``log_every`` steps, the gradient norm, wall and CPU seconds, the CPU.
    """
    if steps < 1 or batch < 1 or warmup < 1 or log_every < 1:
        raise ValueError(
            f"train_diffusion: steps, batch, warmup and log_every must be ≥ 1, got {steps}, {batch}, {warmup}, "
            f"{log_every}"
        )
    config = config or UNetConfig()
    schedule = cosine_schedule(T)
    init_rng, data_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    params = init_unet(config, rng=init_rng, dtype=dtype)
    averaged = {k: v.copy() for k, v in params.items()}
    optimiser = Adam(params, lr=lr)
    log: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "ema": ema,
        "uncond": uncond,
        "clip": clip,
        "dtype": str(np.dtype(dtype)),
        "config": config.to_dict(),
        "parameters": int(sum(v.size for v in params.values())),
        "schedule": f"cosine, T = {T}",
        "cpu": cpu_model(),
        "log_every": log_every,
        "loss": [],
        "grad_norm": [],
    }
    with limited_threads(toy_threads(threads)) as used:
        log["threads"] = used
        window_loss, window_norm = [], []
        wall, cpu = time.perf_counter(), time.process_time()
        model = DiffusionModel(averaged, config, schedule, log)
        for step in progress_bar(range(steps), total=steps, desc="diffusion U-Net", enabled=progress):
            loss, grads, _ = training_step(params, config, schedule, data_rng, batch=batch, uncond=uncond)
            window_norm.append(_clip(grads, clip))
            window_loss.append(loss)
            optimiser.step(grads, lr=lr * min(1.0, (step + 1) / warmup))
            # θ̄ ← d θ̄ + (1 − d) θ, with d = min(ema, (1 + n)/(10 + n)) after n steps
            decay = min(ema, (1.0 + step) / (10.0 + step))
            for k, v in params.items():
                averaged[k] *= decay
                averaged[k] += (1.0 - decay) * v
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log["loss"].append(float(np.mean(window_loss)))
                log["grad_norm"].append(float(np.mean(window_norm)))
                window_loss, window_norm = [], []
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                log["done_steps"] = step + 1
                log["wall_seconds"] = time.perf_counter() - wall
                log["cpu_seconds"] = time.process_time() - cpu
                model.save(str(checkpoint).format(step=step + 1))
        log["done_steps"] = steps
        log["wall_seconds"] = time.perf_counter() - wall
        log["cpu_seconds"] = time.process_time() - cpu
        return model


def main(argv: list[str] | None = None) -> int:
    """``python -m attention_ref.toys.diffusion.train``: train and save the weights and log."""
    parser = argparse.ArgumentParser(prog="python -m attention_ref.toys.diffusion.train", description=__doc__)
    parser.add_argument("--seed", type=int, default=SHIPPED["seed"])
    parser.add_argument("--steps", type=int, default=SHIPPED["steps"])
    parser.add_argument("--out", default="attention_ref/toys/data/diffusion_unet.npz", help="weights (.npz); log .json")
    for name in ("batch", "warmup"):
        parser.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
    for name in ("lr", "ema", "uncond", "clip"):
        parser.add_argument(f"--{name}", type=float, default=DEFAULTS[name])
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--checkpoint", help="also save the model every --checkpoint-every steps here ({step} allowed)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument(
        "--threads", type=int, help="attention_ref's and BLAS's threads (default: ATTENTION_REF_NUM_THREADS, else 1)"
    )
    args = parser.parse_args(argv)
    with limited_threads(toy_threads(args.threads)):
        model = train_diffusion(
            args.seed,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            warmup=args.warmup,
            ema=args.ema,
            uncond=args.uncond,
            clip=args.clip,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            threads=args.threads,
        )
        if not args.no_eval:
            # sampled in float64, as sample() does with the shipped weights
            model.log["evaluation"] = evaluate_model(model.astype("float64"))
    model.save(args.out)
    print(json.dumps({k: v for k, v in model.log.items() if k not in ("loss", "grad_norm")}, indent=1))
    return 0


def retrain_shipped(out: str | Path) -> None:
    """Train the shipped model again with its seed and step count (hours) and write it to ``out`` (.npz and .json)."""
    main(["--seed", str(SHIPPED["seed"]), "--steps", str(SHIPPED["steps"]), "--out", str(out)])


if __name__ == "__main__":
    raise SystemExit(main())
