"""The tolerance holds for every legitimate summation order, on more than the battery's one draw of each case.

The two recipes whose rounding error depends most on the data — logits in the hundreds (a few dominant weights,
so the error rests on a handful of roundings of QKᵀ) and 1024 keys (long sums) — are drawn again with 20 seeds
and head widths d = 8, 16, 32, 64, in float32 and float64, and run through kernels that sum in five different
orders, and an eager kernel whose gradient flows through the max shift. A correct kernel must never be rejected
(a false reject costs as much as a false accept): 0 rejects, and the worst ratio stays well below 1.
"""

from __future__ import annotations

import numpy as np
import oracle_impls as impl
import pytest

from attention_ref.testing import reseeded
from attention_ref.testing.harness import compare_output
from attention_ref.testing.tolerance import OUTPUTS, reference

SEEDS = range(20)
WIDTHS = (8, 16, 32, 64)

# five orders: key by key, pairwise, the BLAS (NumPy's own), FlashAttention's tiles of 32 keys, and QKᵀ summed
# over d from the last feature to the first; and eager code (every op stored in the dtype) whose backward runs
# through the un-detached max shift
KERNELS = {
    "sequential over keys": impl.ordered_attention("sequential"),
    "pairwise": impl.ordered_attention("pairwise"),
    "BLAS": impl.ordered_attention("blas"),
    "tiled over 32 keys": impl.tiled_attention(32),
    "QKᵀ reversed over d": impl.ordered_attention("blas", qk_order="reverse"),
    "eager, autograd through the max shift": impl.eager_attention(),
}


def ratios_of(kernel, ref, dtype):
    """Per output, the check's ratio for one kernel on one reference (the harness's own comparison)."""
    fn, grad_fn = kernel
    x = ref.inputs
    kw = {"mask": x["mask"], "bias": x["bias"], "scale": x["scale"]}
    got = {"out": fn(x["q"], x["k"], x["v"], **kw)}
    got.update(zip(("dq", "dk", "dv"), grad_fn(x["q"], x["k"], x["v"], x["dout"], **kw), strict=True))
    return {
        o: compare_output("sweep", o, got[o], ref.exact[o], ref.kernel_error[o], ref.magnitude[o], dtype).ratio
        for o in OUTPUTS
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("recipe", ["large logits", "long sequence"])
def test_no_correct_order_is_rejected(recipe, dtype):
    rejects, worst = [], {name: 0.0 for name in KERNELS}
    for d in WIDTHS:
        for seed in SEEDS:
            ref = reference(reseeded(recipe, seed, d), dtype)
            for name, kernel in KERNELS.items():
                for output, ratio in ratios_of(kernel, ref, dtype).items():
                    worst[name] = max(worst[name], ratio)
                    if not ratio <= 1:
                        rejects.append((name, d, seed, output, ratio))
    checks = len(WIDTHS) * len(SEEDS) * len(KERNELS) * len(OUTPUTS)
    assert not rejects, f"{len(rejects)} of {checks} checks rejected a correct kernel: {rejects[:5]}"
    # and not by luck: every order stays at half the allowance or less (measured: at most 0.32, see docs/oracle.md)
    assert max(worst.values()) < 0.5, worst


def test_the_reseeded_recipes_are_what_they_claim():
    for d in WIDTHS:
        big = reseeded("large logits", 3, d)
        logits = big.q @ np.swapaxes(big.k, -1, -2) / np.sqrt(d)
        assert big.q.shape[-1] == big.v.shape[-1] == d and 100 < np.max(np.abs(logits)) < 1000
        long = reseeded("long sequence", 3, d)
        assert long.k.shape[-2] == 1024 and abs(np.mean(long.v) - 2) < 0.1
    # another seed is another draw; seed None is the battery's own
    assert not np.array_equal(reseeded("large logits", 1).q, reseeded("large logits", 2).q)
    with pytest.raises(ValueError, match="recipes: large logits, long sequence"):
        reseeded("plain", 0)
