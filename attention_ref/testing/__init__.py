"""attention_ref as a test oracle: check any attention implementation against the float64 reference.

::

    from attention_ref.testing import check_attention, from_torch

    report = check_attention(my_attention, my_attention_grad, dtype="float16")
    print(report)      # per case and output: max abs error, where, allowed, ratio
    assert report.ok

    report = check_attention(*from_torch(my_torch_attention), dtype="bfloat16")
    report = check_attention(my_eager_attention, dtype="float16", policy="eager")  # logits rounded to the dtype

Every verdict is judged under a named policy — ``"fused"`` (the default: logits and softmax
statistics in float32, as FlashAttention and PyTorch's SDPA) or ``"eager"`` — and says which.

Modules: :mod:`.cases` (the battery), :mod:`.policy` (the policies), :mod:`.tolerance` (the
tolerance rule and its reasoning), :mod:`.simulation` (the simulated kernel) and :mod:`.rounding`
(the rounding model they rest on), :mod:`.harness` (``check_attention``) with :mod:`.compare`
(one output against its reference), :mod:`.layouts` and :mod:`.usage`, :mod:`.report`,
:mod:`.torch_wrap` (``from_torch``), :mod:`.vectors` (test vectors for other languages),
:mod:`.examples`, :mod:`.blocks` (``check_diffusers_attention``: a diffusers ``Attention`` module
against the reference block) with
:mod:`.block_model` (the block simulated op by op), :mod:`.transformer_calls` (the calls of the
diffusion transformers' attention), :mod:`.check_model` (``check_model``: every attention call of a
whole diffusers model, layer by layer) with :mod:`.model_layers` (``check_call``: one recorded call of any
attention module it knows). torch is imported only when a torch
function is called; ml_dtypes only for bfloat16. The policy, the figures and how to read a
report: ``docs/oracle.md``.
"""

from .blocks import BLOCK_CASES, BlockCase, check_diffusers_attention
from .cases import CASE_NAMES, CORE_CASES, FEATURES, Case, battery, reseeded
from .check_model import LayerCall, ModelReport, check_model
from .dtypes import DTYPES
from .harness import LAYOUTS, MASKED_ROWS, NotSupported, UsageError, assert_attention_close, check_attention
from .model_layers import check_call
from .report import OutputCheck, Report
from .tolerance import DEFAULT_POLICY, EAGER, FUSED, POLICIES, Policy
from .torch_wrap import from_torch
from .vectors import load_vectors, write_vectors

__all__ = [
    "check_attention",
    "assert_attention_close",
    "NotSupported",
    "UsageError",
    "MASKED_ROWS",
    "LAYOUTS",
    "FEATURES",
    "CORE_CASES",
    "reseeded",
    "check_call",
    "check_model",
    "ModelReport",
    "LayerCall",
    "from_torch",
    "Report",
    "OutputCheck",
    "Case",
    "battery",
    "CASE_NAMES",
    "DTYPES",
    "Policy",
    "DEFAULT_POLICY",
    "FUSED",
    "EAGER",
    "POLICIES",
    "write_vectors",
    "load_vectors",
    "check_diffusers_attention",
    "BlockCase",
    "BLOCK_CASES",
]
