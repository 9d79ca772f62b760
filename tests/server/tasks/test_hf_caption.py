"""server.tasks.hf_caption: kind ``image-to-text`` on a tiny random-init VisionEncoderDecoder
(ViT encoder, BERT decoder) with a handmade WordPiece vocabulary."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.tasks.contract import (
    OptionsError,
    View,
    check_contract,
    parse_options,
    validate_options,
)
from server.tasks.hf_caption import DEFAULT_TOKENS, MAX_BEAMS, MAX_TOKENS, ImageToText
from tests.support.tiny_models import tiny_captioner

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "blue", "sits", "runs"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_captioner(tmp_path_factory.mktemp("caption") / "tiny-captioner", words=WORDS)


@pytest.fixture(scope="module")
def task(folder: Path) -> ImageToText:
    created = ImageToText(str(folder), name="describe")
    created.setup("cpu")
    return created


def images() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((64, 48), (40, 70), (32, 32), (90, 30))]


def opts(task: ImageToText, **options: Any) -> Any:
    return parse_options(task, validate_options(task, options))


def reference(task: ImageToText, image: Image.Image, max_tokens: int, beams: int = 1) -> str:
    """The caption by transformers' own processor, generate and tokenizer, one image."""
    import torch

    pixels = task.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        tokens = task.net.generate(pixel_values=pixels, max_new_tokens=max_tokens,
                                   num_beams=beams, do_sample=False)
    return " ".join(task.tokenizer.decode(tokens[0], skip_special_tokens=True).split())


def test_description_and_options(folder: Path) -> None:
    task = ImageToText(str(folder))
    assert (task.name, task.kind) == ("caption", "image-to-text")
    assert task.model.id == "tiny-captioner"
    assert task.decode.min_short_side == 32
    assert check_contract(task) == []
    assert validate_options(task, {}) == {"max_tokens": DEFAULT_TOKENS, "num_beams": 1}
    for bad, message in (({"max_tokens": 0}, "greater than or equal to 1"),
                         ({"max_tokens": MAX_TOKENS + 1}, f"less than or equal to {MAX_TOKENS}"),
                         ({"num_beams": MAX_BEAMS + 1}, f"less than or equal to {MAX_BEAMS}"),
                         ({"temperature": 0.7}, "unknown option 'temperature'")):
        with pytest.raises(OptionsError, match=message):
            validate_options(task, bad)


def test_captions_match_generate_and_respect_max_tokens(task: ImageToText) -> None:
    for image in images()[:2]:
        view = View.whole(image, image.size)
        for max_tokens in (1, 4, 9):
            parsed = opts(task, max_tokens=max_tokens)
            result = task.encode(task.predict([task.preprocess(view, parsed)])[0], view, parsed)
            assert list(result) == ["caption"]
            caption = result["caption"]
            assert caption == reference(task, image, max_tokens)
            assert 1 <= len(caption.split()) <= max_tokens  # each word is one token here
            assert set(caption.split()) <= set(WORDS)


def test_a_batch_matches_one_by_one_even_with_mixed_options(task: ImageToText) -> None:
    pictures = images()
    options = [opts(task, max_tokens=6), opts(task, max_tokens=3),
               opts(task, max_tokens=6, num_beams=2), opts(task, max_tokens=6)]
    items = [task.preprocess(View.whole(image, image.size), parsed)
             for image, parsed in zip(pictures, options, strict=True)]
    batched = task.predict(items)
    assert len(batched) == len(items)
    for image, parsed, caption in zip(pictures, options, batched, strict=True):
        assert caption == reference(task, image, parsed.max_tokens, parsed.num_beams)
        assert caption == task.predict([task.preprocess(View.whole(image, image.size),
                                                        parsed)])[0]
    assert task.predict([]) == []


def test_a_folder_without_a_generating_model_says_so(tmp_path: Path) -> None:
    from tests.support.tiny_models import tiny_vit_features

    folder = tiny_vit_features(tmp_path / "not-a-captioner")
    with pytest.raises(ValueError, match="no image-to-text model class loads it"):
        ImageToText(str(folder)).setup("cpu")
