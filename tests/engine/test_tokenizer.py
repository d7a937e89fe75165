"""Tokenizer parity: the bundle's tokenizer.json through `tokenizers` vs transformers' CLIPTokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.tokenizer import PromptTokenizer
from transformers import CLIPTokenizer

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF A CAT IN UPPER CASE",
    "repeated    spaces\tand\n\nnewlines   here",
    "punctuation!!! (commas, dots...) & 'quotes' \"double\"; colons: done?",
    "unicode: café naïve Zürich 東京 🦝 emoji ½ ﬁ",
    " ".join(["a long prompt that keeps going"] * 30),  # far past 77 tokens: truncated
    "digits 1234567890 and 3.14",
]


@pytest.fixture(scope="module")
def both(tiny_bundle, tiny_folder):
    b = Bundle(tiny_bundle)
    ours = PromptTokenizer(b.tokenizer_file, b.max_length, b.pad_id, b.pad_token)
    return ours, CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_transformers(both, prompt):
    ours, ref = both
    want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours([prompt])
    assert got.dtype == np.int32 and got.shape == (1, 77)
    assert got[0].tolist() == want


def test_batch_and_truncation(both):
    ours, ref = both
    ids = ours(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    long = ids[PROMPTS.index(PROMPTS[6])]
    assert long[0] == ref.bos_token_id and long[-1] == ref.eos_token_id and ref.pad_token_id not in long[1:-1]


def test_a_truncated_prompt_is_named_with_what_is_left_out(both, caplog):
    """Past 77 tokens a prompt was cut silently; as diffusers does, a warning says which end is ignored."""
    ours, _ = both
    with caplog.at_level("WARNING", logger="sdturbo.engine.tokenizer"):
        ours(["a photo of a cat"])
        assert caplog.text == ""
        ours(["a photo of a cat", "a cat " * 45 + "THE END"])
    assert "prompt 1 is longer than the text encoder's 77 tokens" in caplog.text
    assert "THE END'" in caplog.text and "prompt 0" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdturbo.engine.tokenizer"):
        ours(["a cat " * 45 + "THE END"])  # again (a device pipeline's graph check tokenizes a request twice)
    assert caplog.text == ""


def test_sdxls_two_tokenizers_warn_of_one_truncation_once(xl_bundle, caplog):
    """SDXL's two tokenizers cut a long prompt at the same place: one warning for both, not one each; a bundle
    opened again (another pipeline) warns again, once."""
    long = "a cat " * 45 + "THE END"
    for _ in range(2):
        tokenizers = Bundle(xl_bundle).prompt_tokenizers()
        assert len(tokenizers) == 2
        caplog.clear()
        with caplog.at_level("WARNING", logger="sdturbo.engine.tokenizer"):
            ids = [tok([long]) for tok in tokenizers]
        assert caplog.text.count("is longer than the text encoder's 77 tokens") == 1, caplog.text
        assert "THE END'" in caplog.text
        assert all(i.shape == (1, 77) for i in ids)
