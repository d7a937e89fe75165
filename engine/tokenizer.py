"""Prompt -> token ids with the model's own ``tokenizer.json`` (Hugging Face ``tokenizers``; no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError


class PromptTokenizer:
    """Pads and truncates every prompt to ``max_length`` ids, as the CLIP tokenizer does for SD pipelines."""

    def __init__(self, path: Path, max_length: int, pad_id: int, pad_token: str):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exceptions for a bad file
            raise BundleError(f"cannot read tokenizer {path}: {e}") from e
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[B, max_length] int32 ids."""
        encodings = self._tok.encode_batch(prompts)
        return np.asarray([e.ids for e in encodings], dtype=np.int32)
