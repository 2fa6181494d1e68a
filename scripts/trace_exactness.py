"""The measured exactness behind docs/trace.md's table of model families (a measurement, not a test).

    python scripts/trace_exactness.py [--json out.json] [--families sd3 flux ...]

For each family's toy model (attention_ref.interop.toy_transformers):

* trace: the largest |traced map − the model's own weights| over every traced map (cross, joint, self rows at 3
  query pixels, temporal rows; every head), the weights taken by an independent probe on torch's
  scaled_dot_product_attention (attention_ref.testing.sdpa_probe) — in float64 as diffusers ships, in float64 with
  diffusers' float32 steps (RMSNorm's mean square, Flux's RoPE) computed in float64, and in float32;
* check_model: the worst ratio of the default processors in float32, float16 and bfloat16, and the result of the
  bug planted in one layer (tests/oracle/test_check_model_families.py's PLANTED): the failed layers, the smallest ratio;
* explorer: the number of layers on the trace's explorer page.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [(0.1, 0.9), (0.5, 0.5), (0.99, 0.0)]


def _planted() -> dict:
    spec = importlib.util.spec_from_file_location("planted", ROOT / "tests" / "test_check_model_families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PLANTED


def measure(family: str, planted: dict) -> dict:
    import torch

    from attention_ref.interop import trace
    from attention_ref.interop.toy_transformers import toy_inputs, toy_model
    from attention_ref.testing import check_model
    from attention_ref.testing.sdpa_probe import compare_with_trace, diffusers_in_the_models_dtype, sdpa_probe

    out: dict = {"family": family}
    for label, precision, patched in (("float64 shipped", "float64", False), ("float64", "float64", True),
                                      ("float32", "float32", False)):  # fmt: skip
        model = toy_model(family)
        model = model.double() if precision == "float64" else model
        args, kwargs = toy_inputs(family, model)
        context = diffusers_in_the_models_dtype() if patched else contextlib.nullcontext()
        options = {"self_queries": QUERIES, "heads": "all", "keep": "all", "dtype": precision}
        with context, torch.no_grad(), sdpa_probe(model) as probe, trace(model, **options) as tr:
            model(*args, **kwargs)
        differences = compare_with_trace(tr, probe, text_first=family == "flux")
        out[label] = max(differences.values())
        kinds: dict[str, int] = {}
        for r in tr.layers:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        out["records"] = kinds
    page = tr.explorer(batch=0)
    out["explorer layers"] = len(page.layers)
    model = toy_model(family)
    args, kwargs = toy_inputs(family, model)
    for dtype in ("float32", "float16", "bfloat16"):
        report = check_model(model, *args, dtype=dtype, **kwargs)
        out[f"check {dtype}"] = {"ok": report.ok, "worst": report.worst_ratio(), "calls": len(report.rows)}
    where, make = planted[family]
    model = toy_model(family, seed=1)
    model.get_submodule(where).set_processor(make())
    args, kwargs = toy_inputs(family, model, seed=2)
    report = check_model(model, *args, dtype="float32", **kwargs)
    out["planted"] = {"layer": where, "failed": report.failed_layers,
                      "ratio": min(r.ratio for r in report.failures) if report.failures else None}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from attention_ref.backend import cpu_model
    from attention_ref.interop.toy_transformers import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    planted = _planted()
    results = []
    print(f"{cpu_model()}, torch {torch.__version__}")
    for family in args.families:
        r = measure(family, planted)
        results.append(r)
        checks = ", ".join(f"{d} {r[f'check {d}']['worst']:.3g}" for d in ("float32", "float16", "bfloat16"))
        ok = all(r[f"check {d}"]["ok"] for d in ("float32", "float16", "bfloat16"))
        p = r["planted"]
        print(f"{family:<12} records {r['records']}; |map − model| float64 {r['float64']:.1e} (as shipped "
              f"{r['float64 shipped']:.1e}), float32 {r['float32']:.1e}; check_model {'PASSED' if ok else 'FAILED'} "
              f"worst {checks}; planted in {p['layer']}: failed {p['failed']} ratio ≥ {p['ratio']:.3g}; "
              f"explorer {r['explorer layers']} layers")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
