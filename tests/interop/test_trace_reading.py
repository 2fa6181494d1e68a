"""Reading a trace: records kept per call or summed over the steps, the explorer's layers and page, hand-made
records at two resolutions, word maps with any tokenizer, the resizing modes and the word-map figure."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trace_helpers import QUERIES, unet_inputs  # noqa: E402

from attention_ref.interop import LayerRecord, Trace, trace  # noqa: E402
from attention_ref.interop.toy_models import toy_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet32():
    return toy_unet(sample_size=8, seed=3)


# ----- records, steps, explorer ----------------------------------------------------------------------------
def test_keep_sum_equals_keep_all_summed_and_steps(unet32):
    x, kwargs = unet_inputs(torch.float32, seed=4)
    with torch.no_grad():
        with trace(unet32, self_queries=QUERIES, keep="sum") as summed:
            for t in (900, 500, 100):
                unet32(x * t / 1000, torch.tensor([t, t]), **kwargs)
        with trace(unet32, self_queries=QUERIES, keep="all") as each:
            for t in (900, 500, 100):
                unet32(x * t / 1000, torch.tensor([t, t]), **kwargs)
        with trace(unet32, self_queries=QUERIES) as middle:
            unet32(x * 500 / 1000, torch.tensor([500, 500]), **kwargs)
    assert summed.timesteps == each.timesteps == [900.0, 500.0, 100.0]
    for a, b, c in zip(summed.layers, each.layers, middle.layers, strict=True):
        assert a.calls == b.calls == 3 and b.steps == [0, 1, 2] and b.maps.shape == (3, *a.maps.shape)
        np.testing.assert_allclose(b.maps.sum(axis=0), a.maps, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(b.maps[1], c.maps)
        assert a.nbytes == c.nbytes == a.maps.nbytes and b.nbytes == 3 * a.nbytes
        assert not a.maps.flags.writeable
    np.testing.assert_allclose(each.token_maps(timesteps=[1]), middle.token_maps(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(each.token_maps(timesteps=[-3, 2]), each.token_maps(timesteps=[0, 2]), atol=0)
    with pytest.raises(ValueError, match="keep='all'"):
        summed.token_maps(timesteps=[0])
    with pytest.raises(ValueError, match="outside the 3"):
        each.token_maps(timesteps=[3])


def test_explorer_layers_and_page(unet32):
    pytest.importorskip("matplotlib")
    x, kwargs = unet_inputs(torch.float32, seed=5)
    with torch.no_grad(), trace(unet32, self_queries=QUERIES, keep="all") as tr:
        for t in (800, 200):
            unet32(x, t, **kwargs)
    page = tr.explorer(batch=1, tokens=[f"w{i}" for i in range(7)], title="toy")
    assert [L.name for L in page.layers] == [r.name for r in tr.layers]
    assert page.steps == ("t=800", "t=200") and page.tokens == tuple(f"w{i}" for i in range(7))
    cross = tr.layer("mid_block.attentions.0.transformer_blocks.0.attn2")
    layer = cross.explorer_layer(batch=1)
    assert layer.head_mean and layer.grid == (1, 1)
    np.testing.assert_allclose(layer.weights, cross.maps[:, 1].reshape(2, 1, 1, 7), atol=1e-7)
    self_ = tr.layers[0].explorer_layer(batch=0)
    np.testing.assert_array_equal(self_.query_pixels, tr.layers[0].query_pixels)
    assert self_.weights.shape == (2, 1, 3, 64)
    assert "toy" in page.html()
    with trace(unet32) as one:
        with torch.no_grad():
            unet32(x, 5, **kwargs)
    single = one.explorer()  # keep="sum": one step, the average over the calls; default tokens
    assert single.steps is None and single.tokens[:2] == ("#0", "#1")


def test_hand_made_records_aggregate_at_two_resolutions():
    """Known maps at 2×2 and 4×4: nearest replication, sums, the mean, and the normalisations."""
    tr = Trace(torch.nn.Module())
    coarse = LayerRecord("coarse", "cross", (2, 2), heads=1, keys=2, batch=1, head_mean=True, keep="all")
    fine = LayerRecord("fine", "cross", (4, 4), heads=1, keys=2, batch=1, head_mean=True, keep="all")
    a = np.array([[0.1, 0.2], [0.3, 0.4]])
    coarse._add(np.stack([a, 1 - a], axis=-1)[None], 0)  # token 0 gets a, token 1 the rest: rows sum to 1
    coarse._add(np.stack([a**2, 1 - a**2], axis=-1)[None], 1)
    b = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    fine._add(np.stack([b, 1 - b], axis=-1)[None], 0)
    fine._add(np.stack([b, 1 - b], axis=-1)[None], 1)
    tr.layers, tr._records, tr.keep, tr.timesteps = [coarse, fine], {"coarse": coarse, "fine": fine}, "all", [9, 8]

    summed = tr.token_maps(normalize="sum", interpolation="nearest")
    up = np.kron(a + a**2, np.ones((2, 2)))  # the coarse layer's token 0 over both calls, each cell made 2×2
    np.testing.assert_allclose(summed[0, 0], up + 2 * b, atol=1e-15)
    np.testing.assert_allclose(summed[0, 1], np.kron(2 - a - a**2, np.ones((2, 2))) + 2 * (1 - b), atol=1e-15)
    mean = tr.token_maps(interpolation="nearest")
    np.testing.assert_allclose(mean, summed / 4, atol=1e-15)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, atol=1e-15)  # tokens still sum to 1 at every pixel
    # one step: the coarse map at step 0 only, bilinear
    first = tr.token_maps(timesteps=[0], layers=["coarse"], size=(4, 4), normalize="sum")
    c = np.array([0.0, 0.25, 0.75, 1.0])  # source coordinates of a 2 → 4 bilinear resize, clamped to the edges
    bilinear = 0.1 + 0.1 * c[None, :] + 0.2 * c[:, None]  # a is linear: 0.1 + 0.1·x + 0.2·y
    np.testing.assert_allclose(first[0, 0], bilinear, atol=1e-15)
    np.testing.assert_allclose(tr.token_maps(grid=(2, 2), size=4, normalize="sum", timesteps=[0]), first, atol=0)
    minmax = tr.token_maps(normalize="minmax")
    assert np.allclose(minmax.min(axis=(2, 3)), 0) and np.allclose(minmax.max(axis=(2, 3)), 1)
    daam = tr.token_maps(normalize="daam", word_tokens=[0])
    np.testing.assert_allclose(daam[0, 0], 1.0, atol=1e-15)  # each pixel renormalised over token 0 alone
    with pytest.raises(ValueError, match="word_tokens"):
        tr.token_maps(normalize="daam")
    with pytest.raises(ValueError, match="normalize must be"):
        tr.token_maps(normalize="softmax")
    with pytest.raises(ValueError, match="interpolation must be"):
        tr.token_maps(interpolation="lanczos")


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: start token 0, end token 1, each word one or two ids."""

    def __init__(self):
        self.vocab = {"big": [2], "dog": [3], "on": [4], "sofa": [5, 6]}
        self.all_special_ids = [0, 1]

    def __call__(self, text, add_special_tokens=True):
        ids = [i for word in text.split() for i in self.vocab[word]]
        return {"input_ids": [0, *ids, 1] if add_special_tokens else ids}


def test_word_maps_merge_sub_words_and_repeats_with_any_tokenizer():
    tr = Trace(torch.nn.Module())
    rng = np.random.default_rng(0)
    w = rng.random((1, 3, 3, 8))
    w /= w.sum(-1, keepdims=True)  # a pixel's weights over the 8 tokens sum to 1
    record = LayerRecord("only", "cross", (3, 3), heads=1, keys=8, batch=1, head_mean=True, keep="sum")
    record._add(w, 0)
    tr.layers, tr._records = [record], {"only": record}
    tok = WordTokenizer()
    prompt = "big dog on sofa dog"  # ids [0, 2, 3, 4, 5, 6, 3, 1]
    maps = tr.token_maps()
    words = tr.word_maps(prompt, ["dog", "sofa"], tok)
    np.testing.assert_allclose(words[0, 0], maps[0, 2] + maps[0, 6], atol=1e-15)  # both "dog"s
    np.testing.assert_allclose(words[0, 1], maps[0, 4] + maps[0, 5], atol=1e-15)  # "so" + "fa"
    np.testing.assert_allclose(tr.word_maps(prompt, "sofa", tok, merge="mean")[0, 0], words[0, 1] / 2, atol=1e-15)
    daam = tr.word_maps(prompt, ["big", "dog", "on", "sofa"], tok, normalize="daam")
    np.testing.assert_allclose(daam.sum(axis=1), 1.0, atol=1e-12)  # the word tokens (1 … 6) share each pixel
    with pytest.raises(ValueError, match=r"'on sofa big' \(token ids \[4, 5, 6, 2\]\) is not in"):
        tr.word_maps(prompt, ["on sofa big"], tok)
    with pytest.raises(ValueError, match="merge must be"):
        tr.word_maps(prompt, ["dog"], tok, merge="max")


def test_resize_modes_bicubic_clamped_area_exact():
    from attention_ref.interop.aggregate import resize_maps

    spike = np.zeros((1, 3, 3))
    spike[0, 1, 1] = 1.0
    raw = torch.nn.functional.interpolate(torch.from_numpy(spike)[None], size=(9, 9), mode="bicubic")
    assert raw.min() < 0  # cubic convolution undershoots next to a spike ...
    bicubic = resize_maps(spike, (9, 9), "bicubic")
    assert bicubic.min() == 0 and np.allclose(bicubic, raw.clamp(min=0).numpy()[0])  # ... and is clamped at 0
    fine = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(resize_maps(fine, (2, 2), "area"), [[2.5, 4.5], [10.5, 12.5]], atol=1e-15)
    np.testing.assert_array_equal(resize_maps(fine[None, None], (4, 4)), fine[None, None])  # same size: a copy
    with pytest.raises(ValueError, match="size must be positive"):
        resize_maps(fine, (0, 2))


def test_plot_word_maps_images_and_refusals():
    pytest.importorskip("matplotlib")
    from attention_ref.viz import plot_word_maps

    maps = np.random.default_rng(0).random((2, 4, 4))
    for image in (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.5)):
        fig = plot_word_maps(image, maps, ["dog", "sofa"], title="toy")
        assert [ax.get_xlabel() for ax in fig.axes[:3]] == ["image", "dog", "sofa"]
        assert fig.axes[1].images[1].get_extent() == [-0.5, 7.5, 7.5, -0.5]  # the 4×4 map stretched over 8×8
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_word_maps(np.full((8, 8), 2.0), maps, ["dog", "sofa"])
    with pytest.raises(ValueError, match=r"len\(words\)"):
        plot_word_maps(np.zeros((8, 8)), maps, ["dog"])
    with pytest.raises(ValueError, match="no map to draw"):
        plot_word_maps(np.zeros((8, 8)), np.zeros((0, 4, 4)), [])
