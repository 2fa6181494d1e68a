"""Toy models trained with the library's own backward passes, so attention maps show known answers.

* :func:`train_long_range` — a self-attention block learns to read a pattern's
  far-away twin (``partner_attention`` measures it);
* :func:`train_token_grounding` — a cross-attention block learns which pixels
  each colour and shape word names (``iou`` per word measures it);
* :mod:`attention_ref.toys.diffusion` — a small text-to-image diffusion U-Net:
  :func:`train_diffusion` trains it, :func:`sample` draws scenes from prompts and
  records every attention layer at every denoising step (trained weights ship with
  the package: :func:`load_pretrained`).

Data are generated in code; training uses :class:`Adam` in NumPy. The first two
toys run in well under a minute on two cores; the diffusion U-Net trains for hours,
so its weights are shipped.

The toys import the core (backend, ops, attention, blocks) and nothing above it. Their pictures are
drawn by :mod:`attention_ref.viz`, which imports the toys, never the other way round (e.g.
:func:`attention_ref.viz.sample_explorer`, a diffusion sample's explorer page): the toys load without
matplotlib.
"""

from .adam import Adam
from .diffusion import DiffusionModel, SampleResult, load_pretrained, sample, train_diffusion
from .grounding import GroundingResult, grounding_iou, token_iou, train_token_grounding
from .long_range import LongRangeResult, partner_attention, train_long_range
from .pairs import PairMaps, make_pair_maps, positional_channels
from .scenes import Scenes, make_scenes

__all__ = [
    "Adam",
    "train_long_range",
    "LongRangeResult",
    "partner_attention",
    "PairMaps",
    "make_pair_maps",
    "positional_channels",
    "train_token_grounding",
    "GroundingResult",
    "grounding_iou",
    "token_iou",
    "Scenes",
    "make_scenes",
    "train_diffusion",
    "sample",
    "SampleResult",
    "DiffusionModel",
    "load_pretrained",
]
