"""Prompt -> token ids with the model's own ``tokenizer.json`` (Hugging Face ``tokenizers``; no transformers)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError

log = logging.getLogger(__name__)
WARNED = 64  # truncations remembered per tokenizer (or bundle): each is warned of once while it is among them


class Warned:
    """The latest ``WARNED`` truncations warned of (a run's checks tokenize a request again): one per tokenizer,
    or one for a bundle's tokenizers together (SDXL's two cut a prompt at the same place: one warning)."""

    def __init__(self):
        self._seen: dict[tuple, None] = {}
        self._lock = threading.Lock()

    def first(self, key: tuple) -> bool:
        """True the first time ``key`` comes while it is among the latest ``WARNED`` (any thread)."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > WARNED:
                del self._seen[next(iter(self._seen))]
            return True


class PromptTokenizer:
    """Pads and truncates every prompt to ``max_length`` ids, as the CLIP tokenizer does for SD pipelines."""

    def __init__(self, path: Path, max_length: int, pad_id: int, pad_token: str, warned: Warned | None = None):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exceptions for a bad file
            raise BundleError(f"cannot read tokenizer {path}: {e}") from e
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length
        self._warned = warned or Warned()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[B, max_length] int32 ids."""
        encodings = self._tok.encode_batch(prompts)
        for i, e in enumerate(encodings):
            if not e.overflowing:
                continue
            kept = max(
                (end for (_, end), special in zip(e.offsets, e.special_tokens_mask, strict=True) if not special),
                default=0,
            )
            dropped = prompts[i][kept:].strip()
            if self._warned.first((prompts[i], self.max_length, dropped)):  # as diffusers: naming what is left out
                log.warning(
                    "prompt %d is longer than the text encoder's %d tokens; this end of it is ignored: %r",
                    i,
                    self.max_length,
                    dropped if len(dropped) <= 200 else dropped[:200] + "...",
                )
        return np.asarray([e.ids for e in encodings], dtype=np.int32)
