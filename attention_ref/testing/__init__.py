"""attention_ref as a test oracle: check any attention implementation against the float64 reference.

::

    from attention_ref.testing import check_attention, from_torch

    report = check_attention(my_attention, grad_fn=my_attention_grad, dtype="float16")
    print(report)      # per case and output: max abs error, where, allowed, ratio
    assert report.ok

Modules: :mod:`.cases` (the battery), :mod:`.tolerance` (the tolerance policy and its
reasoning), :mod:`.harness` (``check_attention``), :mod:`.report`, :mod:`.torch_wrap`
(``from_torch``), :mod:`.vectors` (test vectors for other languages), :mod:`.examples`,
:mod:`.blocks` (``check_diffusers_attention``: a diffusers ``Attention`` module against the reference block).
torch is imported only when a torch function is called; ml_dtypes only for bfloat16.
"""

from .blocks import BLOCK_CASES, BlockCase, check_diffusers_attention
from .cases import CASE_NAMES, Case, battery
from .dtypes import DTYPES
from .harness import assert_attention_close, check_attention
from .report import OutputCheck, Report
from .tolerance import DEFAULT_POLICY, Policy
from .torch_wrap import from_torch
from .vectors import load_vectors, write_vectors

__all__ = [
    "check_attention",
    "assert_attention_close",
    "from_torch",
    "Report",
    "OutputCheck",
    "Case",
    "battery",
    "CASE_NAMES",
    "DTYPES",
    "Policy",
    "DEFAULT_POLICY",
    "write_vectors",
    "load_vectors",
    "check_diffusers_attention",
    "BlockCase",
    "BLOCK_CASES",
]
