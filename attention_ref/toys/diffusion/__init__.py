"""A small text-to-image diffusion U-Net in NumPy, trained with the library's own backward passes.

* :mod:`.unet` — the U-Net (residual blocks with a timestep embedding, spatial
  transformers at 8×8 and 16×16), :func:`unet_forward` / :func:`unet_backward`;
* :mod:`.data` — scenes of one or two coloured shapes with their prompts, and the frozen text encoder;
* :mod:`.schedule` — the cosine noise schedule, the forward process, DDIM;
* :mod:`.train` — :func:`train_diffusion`: the ε-prediction loss, Adam, prompt dropping for guidance;
* :mod:`.sample` — :func:`sample`: DDIM with classifier-free guidance, every attention layer traced at every step;
* :mod:`.evaluate` — colour, shape and grounding scores of generated scenes;
* :mod:`.model` — :class:`DiffusionModel` and :func:`load_pretrained` (the shipped weights).
"""

from .data import (
    EMPTY_PROMPT,
    EXAMPLE_PROMPT,
    HELD_OUT_PAIRS,
    all_prompts,
    encode_prompts,
    held_out_prompts,
    make_diffusion_scenes,
)
from .evaluate import classify_shape, evaluate_model, score_samples, score_scene, segment_objects
from .model import DiffusionModel, load_pretrained, pretrained_log
from .sample import LayerTrace, SampleResult, sample
from .schedule import cosine_schedule, ddim_step, ddim_timesteps, guided_eps, noise_images
from .train import diffusion_loss, train_diffusion, training_step
from .unet import UNetCache, UNetConfig, init_unet, unet_backward, unet_forward

__all__ = [
    "UNetConfig",
    "UNetCache",
    "init_unet",
    "unet_forward",
    "unet_backward",
    "EMPTY_PROMPT",
    "EXAMPLE_PROMPT",
    "HELD_OUT_PAIRS",
    "all_prompts",
    "held_out_prompts",
    "encode_prompts",
    "make_diffusion_scenes",
    "cosine_schedule",
    "noise_images",
    "ddim_timesteps",
    "ddim_step",
    "guided_eps",
    "diffusion_loss",
    "training_step",
    "train_diffusion",
    "sample",
    "SampleResult",
    "LayerTrace",
    "segment_objects",
    "classify_shape",
    "score_scene",
    "score_samples",
    "evaluate_model",
    "DiffusionModel",
    "load_pretrained",
    "pretrained_log",
]
