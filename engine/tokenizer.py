"""Prompt -> token ids with the model's own ``tokenizer.json`` (Hugging Face ``tokenizers``; no transformers)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError

log = logging.getLogger(__name__)
WARNED = 64  # truncated prompts remembered per tokenizer: each is warned of once while it is among them


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
        self._warned: dict[str, None] = {}  # the latest prompts warned of as truncated (a run's checks re-tokenize)
        self._lock = threading.Lock()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[B, max_length] int32 ids."""
        encodings = self._tok.encode_batch(prompts)
        for i, e in enumerate(encodings):
            if e.overflowing and self._first_warning(prompts[i]):  # as diffusers: truncated, naming what is left out
                kept = max(
                    (end for (_, end), special in zip(e.offsets, e.special_tokens_mask, strict=True) if not special),
                    default=0,
                )
                dropped = prompts[i][kept:].strip()
                log.warning(
                    "prompt %d is longer than the text encoder's %d tokens; this end of it is ignored: %r",
                    i,
                    self.max_length,
                    dropped if len(dropped) <= 200 else dropped[:200] + "...",
                )
        return np.asarray([e.ids for e in encodings], dtype=np.int32)

    def _first_warning(self, prompt: str) -> bool:
        """True the first time ``prompt`` is truncated while it is among the latest ``WARNED`` (any thread)."""
        with self._lock:
            if prompt in self._warned:
                return False
            self._warned[prompt] = None
            if len(self._warned) > WARNED:
                del self._warned[next(iter(self._warned))]
            return True
