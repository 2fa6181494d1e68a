"""The figures of docs/oracle.md: worst ratios of correct peers, planted bugs' ratios, diffusers processors.

    python scripts/oracle_tables.py [peers] [bugs] [blocks]      # all three by default (several minutes on 2 cores)

Prints Markdown tables. Every check runs the whole battery, forward and backward, under the policy each row names
(the default, ``fused``, unless said otherwise). torch and diffusers rows need those packages.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracle"))

import numpy as np
import oracle_impls as impl
import oracle_kernels as kernels

from attention_ref.testing import check_attention, examples, from_torch

DTYPES = ("float32", "float16", "bfloat16", "float64")


def worst(report) -> str:
    if not report.ok and report.failures:
        return "fails"
    text = f"{report.worst_ratio():.2g}"
    n = len(report.unsupported_cases)
    return f"{text} ({n} n/s)" if n else text


def peers() -> None:
    import torch

    torch.set_num_threads(1)
    rows = {
        "torch SDPA (PyTorch picks the backend)": (from_torch(examples.torch_sdpa), "fused"),
        "torch SDPA, MATH backend": (from_torch(examples.torch_sdpa_math), "fused"),
        "torch SDPA, CPU flash backend": (from_torch(examples.torch_sdpa_flash), "fused"),
        "`F.multi_head_attention_forward`": (from_torch(examples.torch_mha), "fused"),
        "a key-by-key kernel (every sum sequential)": (kernels.ordered_attention("sequential"), "fused"),
        "a tiled kernel (online softmax, 32 keys)": (kernels.tiled_attention(32), "fused"),
        "two-pass forward, P = exp(S − lse)": (kernels.lse_attention("two-pass"), "fused"),
        "split-K (4 splits) merged by lse": (kernels.lse_attention("split-k"), "fused"),
        "backward from lse, D = ΣP∘dP": (kernels.lse_attention(d_from="ΣP∘dP"), "fused"),
        "`examples.numpy_attention`": ((examples.numpy_attention, examples.numpy_attention_grad), "fused"),
        "eager code, autograd through the max shift (NumPy), **eager**": (kernels.eager_attention(), "eager"),
        "the same in PyTorch, **eager**": (from_torch(kernels.torch_eager_attention), "eager"),
        "eager code (NumPy) under **fused**": (kernels.eager_attention(), "fused"),
    }
    print("| peer | " + " | ".join(DTYPES) + " |")
    print("|---|" + "---|" * len(DTYPES))
    for name, (pair, policy) in rows.items():
        cells = [worst(check_attention(*pair, dtype=dt, policy=policy)) for dt in DTYPES]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# (name, fn, grad_fn, dtypes in which it is a bug; None: every dtype)
BUGS = [
    ("default scale `1/d`", impl.wrong_scale, None, None),
    ("softmax over the wrong axis", impl.softmax_wrong_axis, None, None),
    ("no max subtraction", impl.no_max_subtraction, None, None),
    ("mask ignored", impl.mask_ignored, None, None),
    ("mask inverted", impl.inverted_mask, None, None),
    ("mask applied on the query axis (N == M)", impl.mask_on_query_axis, None, None),
    ("NaN on fully masked rows", impl.nan_on_fully_masked_rows, None, None),
    ("finite mask value (dead rows average `v`)", impl.finite_mask_value, None, None),
    ("bias ignored", impl.bias_ignored, None, None),
    ("the last key dropped", impl.key_dropped, None, None),
    ("online softmax without rescaling", impl.online_softmax_without_rescale, None, None),
    ("the last partial key tile dropped", impl.last_partial_tile_dropped, None, None),
    ("the last query tile's size used for every tile", impl.last_query_tile_size_everywhere, None, None),
    ("dropout p = 0.1 left on", impl.dropout_left_on, None, None),
    ("`P·V` accumulated in bfloat16", impl.pv_accumulated_in_bfloat16, None, None),
    ("`P·V` accumulated in the dtype", impl.pv_accumulated_in_dtype, None, ("float16", "bfloat16")),
    ("logits stored in float16", impl.logits_rounded_to_float16, None, ("float32", "float16", "bfloat16")),
    ("backward: softmax term missing", None, impl.grad_missing_softmax_term, None),
    ("backward: `dq` without the scale", None, impl.grad_dq_missing_scale, None),
    ("backward: `dS` where `dSᵀ` belongs", None, impl.grad_dk_not_transposed, None),
    ("backward: mask forgotten when recomputing `P`", impl.numpy_forward, impl.grad_recomputes_p_without_mask, None),
    ("backward: `dV` accumulated over the queries in the dtype", None, impl.grad_dv_accumulated_in_dtype,
     ("float16", "bfloat16")),
    ("causal aligned bottom-right where top-left is meant", impl.causal_bottom_right_for_top_left, None, None),
    ("causal aligned top-left where bottom-right is meant", impl.causal_top_left_for_bottom_right, None, None),
    ("`scale or default` (scale 0 taken as the default)", impl.scale_or_default, impl.grad_scale_or_default, None),
    ("online softmax's running ℓ kept in float16", impl.online_sum_in_float16, None, ("float16", "bfloat16")),
    ("softmax sum ℓ accumulated in float16", impl.softmax_sum_in_float16, None, ("float16", "bfloat16")),
    ("backward: lse from an ℓ summed in float16", None, impl.grad_lse_from_sum_in_float16, ("float16", "bfloat16")),
    ("max in float16 for the numerator, float32 for ℓ", impl.max_in_float16_numerator, None, ("float16", "bfloat16")),
    ("masking by multiplying `exp` (max over masked keys too)", impl.mask_by_multiplying_exp, None, None),
    ("backward: `dK = 0` whenever M ≥ 512", None, impl.grad_dk_zero_for_long_sequences, None),
    ("backward: `dq = dk = 0` when max|q| > 20", None, impl.grad_zero_for_large_queries, None),
]  # fmt: skip


def bugs() -> None:
    print("| planted bug | " + " | ".join(DTYPES) + " |")
    print("|---|" + "---|" * len(DTYPES))
    caught = dict.fromkeys(DTYPES, 0)
    named = dict.fromkeys(DTYPES, 0)
    float32_inside = {"float64"}  # most planted bugs compute in float32: in float64 every one of them fails anyway
    for name, fn, grad_fn, where in BUGS:
        cells = []
        for dt in DTYPES:
            if (where is not None and dt not in where) or (
                dt in float32_inside and where is None and "causal" not in name and "scale or" not in name
            ):
                cells.append("—")
                continue
            report = check_attention(fn, grad_fn, dtype=dt)
            ratio = report.worst_ratio()
            named[dt] += 1
            caught[dt] += not report.ok
            cells.append("inf" if np.isinf(ratio) else f"{ratio:.3g}" + ("" if not report.ok else " (PASSES)"))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\ncaught: " + ", ".join(f"{dt} {caught[dt]}/{named[dt]}" for dt in DTYPES))


def blocks() -> None:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    from attention_ref.testing import check_diffusers_attention

    torch.set_num_threads(1)
    processors = {
        "AttnProcessor": AttnProcessor,
        "AttnProcessor2_0": AttnProcessor2_0,
        "SlicedAttnProcessor": lambda: SlicedAttnProcessor(slice_size=1),
    }
    print("| processor (policy chosen) | " + " | ".join(DTYPES) + " |")
    print("|---|" + "---|" * len(DTYPES))
    for name, make in processors.items():
        cells, policy = [], ""
        for dt in DTYPES:
            ratios = []
            for seed in range(4):
                for cross in (False, True):
                    attn = Attention(16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8, bias=True,
                                     norm_num_groups=None if cross else 4, residual_connection=not cross,
                                     rescale_output_factor=1.0 if cross else 2.0, processor=make())  # fmt: skip
                    g = torch.Generator().manual_seed(seed)
                    with torch.no_grad():
                        for pname, p in attn.named_parameters():
                            base = 1.0 if pname.startswith("group_norm") and pname.endswith("weight") else 0.0
                            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
                    report = check_diffusers_attention(attn.eval(), dtype=dt, seed=seed)
                    policy = report.policy
                    ratios.append(np.inf if not report.ok else report.worst_ratio())
            cells.append(f"{max(ratios):.2g}")
        print(f"| `{name}` ({policy}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["peers", "bugs", "blocks"]
    for part in parts:
        start = time.time()
        {"peers": peers, "bugs": bugs, "blocks": blocks}[part]()
        print(f"({part}: {time.time() - start:.0f} s)\n", flush=True)
