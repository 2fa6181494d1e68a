"""Time overhead of attention_ref.interop.trace: denoising steps of a U-Net with and without tracing.

    python scripts/bench_trace.py                               # toy widths (32, 64, 128, 128), 32×32 latent
    python scripts/bench_trace.py --widths 320 640 1280 1280 --side 32 --steps 3   # SD 1.5's widths
    python scripts/bench_trace.py --device cuda                 # on a GPU (synchronised timings)
    python scripts/bench_trace.py --family sd3 --side 32         # a diffusion transformer (toy_transformers)

A U-Net with Stable Diffusion 1.5's block layout (attention_ref.interop.toy_models.toy_unet, random weights)
runs ``--steps`` denoising steps on a batch of 2 (classifier-free guidance) with a 77-token context, untraced
and traced, the two alternating ``--repeats`` times; the ratio of the medians is printed for each trace
setting. On the CPU the time is process time (all threads), which another job on a shared machine disturbs
less than the wall clock; ``--threads`` sets torch's threads (default 1). This is a benchmark, not a test:
nothing is asserted.

With ``--family`` (``sd3``, ``sd35``, ``flux``, ``pixart``, ``dit``, ``sana``, ``wan``, ``svd``, ``animatediff``)
the model is :func:`attention_ref.interop.toy_transformers.toy_model` of that family with ``--heads`` heads of
``--head-dim`` channels and ``--layers`` blocks (the video U-Nets keep their toy sizes), on a ``--side``×``--side``
latent with a 77-token prompt; DiT and the video models have no prompt to trace by default, so their default
setting is the self-attention rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timer(device: Any, steps: int, call: Callable[[int], Any]) -> Callable[[], float]:
    """``run()``: the time of ``call(0)`` … ``call(steps − 1)`` without gradients — process time on the CPU (all
    threads), the wall clock between synchronisations on a GPU."""
    import torch

    def run() -> float:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter() if cuda else time.process_time()
        with torch.no_grad():
            for i in range(steps):
                call(i)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - start

    return run


def alternate(run: Callable[[], float], model: Any, settings: dict, repeats: int) -> tuple[float, dict, Any]:
    """Untraced and traced under each of ``settings`` (trace options), alternating ``repeats`` times after a
    warm-up: the untraced median, the traced medians by setting, and the last trace."""
    from attention_ref.interop import trace

    run()  # warm-up
    plain, traced, traces = [], {name: [] for name in settings}, []
    for _ in range(repeats):
        plain.append(run())
        for name, options in settings.items():
            with trace(model, **options) as tr:
                traced[name].append(run())
            traces.append(tr)
    return statistics.median(plain), {name: statistics.median(t) for name, t in traced.items()}, traces[-1]


def report(args: argparse.Namespace, base: float, traced: dict, unit: str, width: int, **extra: Any) -> dict:
    """Print the untraced time and each setting's time and ratio per ``unit`` ("step", "call"); the figures (also
    written to ``--json``)."""
    print(f"  untraced: {base / args.steps * 1e3:8.1f} ms per {unit}")
    figures = {**extra, f"untraced_s_per_{unit}": base / args.steps, "traced": {}}
    for name, t in traced.items():
        figures["traced"][name] = {f"s_per_{unit}": t / args.steps, "ratio": t / base}
        print(f"  {name:<{width}} {t / args.steps * 1e3:8.1f} ms per {unit}   ×{t / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))
    return figures


def main(argv: list[str] | None = None) -> dict:
    import torch

    from attention_ref.backend import cpu_model
    from attention_ref.interop.toy_models import toy_unet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs=4, default=(32, 64, 128, 128))
    parser.add_argument("--side", type=int, default=32, help="the latent's side (SD 1.5 at 512 px: 64)")
    parser.add_argument("--context-dim", type=int, default=None, help="default: 32, or 768 with SD 1.5's widths")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--family", default=None, help="a toy_transformers family instead of the U-Net")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.family:
        return family_bench(args)

    torch.set_num_threads(args.threads)
    context_dim = args.context_dim or (768 if tuple(args.widths) == (320, 640, 1280, 1280) else 32)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    unet = toy_unet(args.widths, sample_size=args.side, cross_attention_dim=context_dim)
    torch.nn.Module.to(unet, device, dtype)  # every parameter in dtype (no diffusers message)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.side, args.side, generator=g).to(device, dtype)
    context = torch.randn(2, 77, context_dim, generator=g).to(device, dtype)

    run = timer(device, args.steps, lambda i: unet(x, 1000 - 40 * i, encoder_hidden_states=context))

    settings = {
        "cross, head mean (default)": {},
        "cross + 4 self-attention rows": {"self_queries": [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]},
        "cross, every head, keep='all'": {"heads": "all", "keep": "all"},
        "cross in float64": {"dtype": "float64"},
    }
    base, traced, _ = alternate(run, unet, settings, args.repeats)
    where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"U-Net widths {tuple(args.widths)}, latent {args.side}×{args.side}, batch 2, 77 tokens, {args.dtype}, "
          f"{args.steps} steps, {args.repeats} repeats; {where}, {args.threads} torch thread(s)")  # fmt: skip
    return report(args, base, traced, "step", 32)


def family_bench(args: argparse.Namespace) -> dict:
    """The traced/untraced time ratio of one family's toy model, the settings alternating."""
    import torch

    from attention_ref.backend import cpu_model
    from attention_ref.interop.toy_transformers import toy_inputs, toy_model

    torch.set_num_threads(args.threads)
    model = toy_model(args.family, heads=args.heads, head_dim=args.head_dim, layers=args.layers)
    torch.nn.Module.to(model, torch.device(args.device), getattr(torch, args.dtype))
    inputs, kwargs = toy_inputs(args.family, model, tokens=77, size=(args.side, args.side), padded=False)
    device = torch.device(args.device)

    run = timer(device, args.steps, lambda i: model(*inputs, **kwargs))

    rows = {"self_queries": [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]}
    settings = {
        "default (cross/joint, head mean)": {} if args.family not in ("dit",) else rows,
        "+ 4 self-attention rows": rows,
        "every head, keep='all'": {"heads": "all", "keep": "all", **rows},
        "in float64": {"dtype": "float64", **rows},
    }
    base, traced, tr = alternate(run, model, settings, args.repeats)
    where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.family}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.side}×{args.side} latent, batch 2, 77 tokens, {args.dtype}, {len(tr.layers)} records; "
          f"{args.steps} calls × {args.repeats} repeats; {where}, {args.threads} torch thread(s)")  # fmt: skip
    return report(args, base, traced, "call", 34, family=args.family)


if __name__ == "__main__":
    main()
