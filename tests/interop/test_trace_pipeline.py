"""trace on a whole StableDiffusionPipeline built offline (toy parts, a CLIP tokenizer written by the test): the
image is unchanged, the steps are the scheduler's, words are found through the real tokenizer, maps overlay."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from attention_ref.interop import trace  # noqa: E402
from attention_ref.interop.toy_models import toy_clip_tokenizer, toy_pipeline  # noqa: E402

WORDS = ["a", "photo", "of", "dog", "on", "red", "sofa", "cat"]
PROMPT = "a photo of a dog on a red sofa"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return toy_pipeline(WORDS, tmp_path_factory.mktemp("tokenizer"), sample_size=8, split=("sofa",))


def generate(pipe):
    out = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
               output_type="np")  # fmt: skip
    return out.images[0]


def test_toy_tokenizer_splits_only_the_words_asked(tmp_path):
    tok = toy_clip_tokenizer(WORDS, tmp_path, split=("sofa",))
    tokens = tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"])
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>", "on</w>", "a</w>",
                      "red</w>", "so", "fa</w>", "<|endoftext|>"]  # fmt: skip


def test_pipeline_image_unchanged_and_word_maps(pipe):
    plain = generate(pipe)
    with trace(pipe, keep="all", self_queries=[(0.5, 0.5)]) as tr:
        traced = generate(pipe)
    assert np.array_equal(plain, traced)
    assert tr.timesteps == [float(t) for t in pipe.scheduler.timesteps]  # one U-Net call per step (CFG batched)
    cross = tr.select(kind="cross")
    assert len(cross) == 16 and {r.batch for r in cross} == {2} and {r.keys for r in cross} == {77}
    maps = tr.token_maps()  # (B, 77, 8, 8)
    words = tr.word_maps(PROMPT, ["dog", "sofa", "a"], pipe.tokenizer)
    assert words.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(words[:, 0], maps[:, 5], atol=0)  # "dog" is token 5
    np.testing.assert_allclose(words[:, 1], maps[:, 9] + maps[:, 10], atol=1e-15)  # "sofa" = "so" + "fa</w>"
    np.testing.assert_allclose(words[:, 2], maps[:, [1, 4, 7]].sum(axis=1), atol=1e-15)  # every "a"
    mean = tr.word_maps(PROMPT, "sofa", pipe.tokenizer, merge="mean")
    np.testing.assert_allclose(mean[:, 0], words[:, 1] / 2, atol=1e-15)
    daam = tr.word_maps(PROMPT, ["photo", "of", "dog", "on", "red", "sofa"], pipe.tokenizer, normalize="daam")
    a_maps = tr.word_maps(PROMPT, ["a"], pipe.tokenizer, normalize="daam")
    np.testing.assert_allclose(daam.sum(axis=1) + a_maps[:, 0], 1.0, atol=1e-12)  # word tokens sum to 1 per pixel
    big = tr.word_maps(PROMPT, ["dog"], pipe.tokenizer, size=pipe.unet.config.sample_size * 8, normalize="minmax")
    assert big.shape == (2, 1, 64, 64) and np.isclose(big.min(), 0) and np.isclose(big.max(), 1)
    with pytest.raises(ValueError, match=r"'cat' \(token ids .*\) is not in the prompt's tokens"):
        tr.word_maps(PROMPT, ["cat"], pipe.tokenizer)

    page = tr.explorer(batch=1, prompt=PROMPT, tokenizer=pipe.tokenizer, image=traced)
    assert page.tokens[:3] == ("<|startoftext|>", "a</w>", "photo</w>") and len(page.tokens) == 77
    assert len(page.steps) == 4 and len(page.layers) == 32

    pytest.importorskip("matplotlib")
    from attention_ref.viz import plot_word_maps

    fig = plot_word_maps(traced, words[1], ["dog", "sofa", "a"], title="toy")
    assert len(fig.axes) == 5  # the image, three words, the colour bar
    assert [ax.get_xlabel() for ax in fig.axes[:4]] == ["image", "dog", "sofa", "a"]
    with pytest.raises(ValueError, match=r"len\(words\)"):
        plot_word_maps(traced, words[1], ["dog"])
