"""attention_ref.toys: data, optimiser, gradients of the toy models, and the trained thresholds (fixed seeds)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from attention_ref.gradcheck import numerical_gradient, rel_error
from attention_ref.toys import (
    Adam,
    grounding,
    grounding_iou,
    long_range,
    make_pair_maps,
    make_scenes,
    partner_attention,
    positional_channels,
    token_iou,
    train_long_range,
    train_token_grounding,
)
from attention_ref.toys.scenes import COLOURS, SHAPES, VOCAB

# ---------------------------------------------------------------- pieces


def test_the_toys_never_import_viz():
    """viz sits above the toys: it imports them to draw what they compute (viz.sample_explorer), never the other
    way, not even lazily inside a function, so that the toys load without matplotlib."""
    folder = Path(grounding.__file__).parent
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any("viz" in name.split(".") for name in names):
                found.append(f"{path.relative_to(folder)}:{node.lineno}")
    assert found == [], f"the toys import viz at {found}"


def test_adam_step_follows_the_formula_and_minimises_a_quadratic():
    p = {"w": np.array([1.0, -2.0])}
    opt = Adam(p, lr=0.1)
    g = np.array([0.5, -4.0])
    opt.step({"w": g})
    # first step: m̂ = g, v̂ = g², so the move is lr · g / (|g| + eps)
    np.testing.assert_allclose(p["w"], [1.0 - 0.1, -2.0 + 0.1], rtol=1e-7)
    target = np.array([3.0, -1.0])
    for _ in range(500):
        opt.step({"w": 2 * (p["w"] - target)})
    np.testing.assert_allclose(p["w"], target, atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(3)})


def test_pair_maps_hold_identical_far_apart_copies_whose_target_is_the_partners_message():
    data = make_pair_maps(np.random.default_rng(0), 16, size=10, pairs=2, patch=2, code_channels=8)
    assert data.x.shape == (16, 10, 10, 9)
    for b in range(16):
        for p in range(2):
            a, c = (np.argwhere(data.copy_id[b] == 2 * p + k) for k in (0, 1))
            assert len(a) == len(c) == 4
            assert np.hypot(*(a[0] - c[0])) >= 5  # at least half the map apart
            xa, xc = data.x[b][tuple(a.T)], data.x[b][tuple(c.T)]
            np.testing.assert_array_equal(xa[:, :8], xc[:, :8])  # the same code
            np.testing.assert_array_equal(data.target[b][tuple(a.T)], xc[:, 8])  # target = partner's message
        assert np.all(data.x[b][data.copy_id[b] < 0] == 0)
    pe = positional_channels(10)
    np.testing.assert_allclose(pe[0, 0] @ pe[5, 5], -2.0, atol=1e-12)  # half a map away: opposite
    np.testing.assert_allclose(pe[3, 4] @ pe[3, 4], 2.0)


def test_partner_attention_on_hand_made_weights():
    copy_id = np.full((1, 2, 3), -1)
    copy_id[0, 0, 0], copy_id[0, 1, 2] = 0, 1  # pixels 0 and 5 are twins
    w = np.full((1, 1, 6, 6), 0.1)
    w[0, 0, 0, 5], w[0, 0, 5, 0] = 0.5, 0.3
    assert partner_attention(w, copy_id) == pytest.approx(0.4)


def test_scenes_have_disjoint_objects_matching_their_prompts():
    scenes = make_scenes(np.random.default_rng(1), 32)
    colours = {VOCAB.index(c): np.array(v) for c, v in COLOURS.items()}
    for b in range(32):
        n = int(scenes.masks[b].any(axis=(1, 2)).sum())
        assert n in (2, 3)
        assert scenes.lengths[b] == 3 * n + 1 and scenes.masks[b].sum(axis=0).max() == 1
        words = scenes.prompt(b)
        assert words[0] == "<sot>" and words[scenes.lengths[b] - 1] == "<eot>"
        for t in np.flatnonzero(scenes.token_object[b] >= 0):
            mask = scenes.masks[b, scenes.token_object[b, t]]
            if scenes.words[b, t] in colours:
                mean = scenes.images[b][mask].mean(axis=0)
                np.testing.assert_allclose(mean, colours[scenes.words[b, t]], atol=0.05)
            else:
                assert VOCAB[scenes.words[b, t]] in SHAPES


def test_token_iou():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert token_iou(mask * 0.7 + 0.1, mask) == 1.0
    heat = np.zeros((4, 4))
    heat[:2, :3] = 1.0  # 6 pixels predicted, 4 of them right
    assert token_iou(heat, mask) == pytest.approx(4 / 6)
    assert token_iou(np.zeros((4, 4)), mask) == 0.0


def test_long_range_model_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    params = {f"attn.{k}": v for k, v in long_range.init_self_attention(13, groups=1, rng=rng).items()}
    params["readout.weight"], params["readout.bias"] = rng.standard_normal((13, 1)), rng.standard_normal(1)
    data = make_pair_maps(rng, 2, size=10)
    dpred = rng.standard_normal((2, 10, 10))
    grads = long_range.model_backward(dpred, long_range.model_forward(params, data)[1])
    for name in ("attn.q.weight", "attn.norm.bias", "readout.weight"):

        def f(p, name=name):
            return long_range.model_forward({**params, name: p}, data)[0]

        assert rel_error(grads[name], numerical_gradient(f, params[name].copy(), dpred)) < 1e-7, name


def test_grounding_model_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    params = grounding._init_params(rng)
    scenes = make_scenes(rng, 2)
    context = grounding.make_context(scenes, rng.standard_normal(scenes.words.shape))
    dpred = rng.standard_normal((2, 16, 16, 2))
    grads = grounding.model_backward(dpred, grounding.model_forward(params, scenes, context)[1])
    for name in ("conv0.bias", "conv1.bias", "attn.k.weight", "readout.bias"):

        def f(p, name=name):
            return grounding.model_forward({**params, name: p}, scenes, context)[0]

        assert rel_error(grads[name], numerical_gradient(f, params[name].copy(), dpred)) < 1e-7, name


def test_grounding_target_puts_each_words_payload_on_its_object():
    scenes = make_scenes(np.random.default_rng(5), 4)
    payload = np.arange(4 * 10, dtype=float).reshape(4, 10) + 1
    target = grounding.make_target(scenes, payload)
    context = grounding.make_context(scenes, payload)
    for b in range(4):
        for t in np.flatnonzero(scenes.token_object[b] >= 0):
            channel = 0 if VOCAB[scenes.words[b, t]] in COLOURS else 1
            assert np.all(target[b, scenes.masks[b, scenes.token_object[b, t]], channel] == payload[b, t])
            assert context[b, t, 16 + channel] == payload[b, t] and context[b, t, 17 - channel] == 0
        assert np.all(target[b][~scenes.masks[b].any(axis=0)] == 0)


# ---------------------------------------------------------------- training (fixed seeds)


@pytest.mark.slow
def test_long_range_toy_puts_half_its_attention_on_the_partner(capsys):
    result = train_long_range(seed=0)
    assert result.partner_attention >= 0.5
    assert result.partner_attention_init < 0.2  # near chance before training
    assert result.accuracy >= 0.9 and result.accuracy_init < 0.65
    assert result.weights.shape == (64, 1, 100, 100)
    np.testing.assert_allclose(result.weights.sum(-1), 1.0, atol=1e-12)
    assert partner_attention(result.weights, result.eval_data.copy_id) == result.partner_attention
    assert capsys.readouterr().err == ""  # no progress bar outside a terminal or notebook


@pytest.mark.slow
def test_token_grounding_toy_ties_each_word_to_its_object(capsys):
    result = train_token_grounding(seed=0)
    assert set(result.iou) == {*COLOURS, *SHAPES}
    assert result.mean_iou >= 0.8
    assert min(result.iou.values()) >= 0.5
    assert np.mean(list(result.iou_init.values())) < 0.3
    assert result.eval_loss < 0.25 * result.eval_loss_init
    assert grounding_iou(result.weights, result.eval_scenes) == result.iou
    assert capsys.readouterr().err == ""
