"""A small CLIP-format BPE vocabulary for random-weight models.

No real CLIP vocabulary can be downloaded offline. Random weights make any vocabulary as good as any
other, so ``random:*`` models get this one: CLIP's byte-level alphabet (as ``</w>`` and plain tokens),
merges learned from a short built-in text, and CLIP's special tokens. It is saved as ordinary
``vocab.json`` / ``merges.txt`` files, so transformers' ``CLIPTokenizer`` reads it like any other.
"""

from __future__ import annotations

import collections
import itertools
from functools import lru_cache

CORPUS = """
a cinematic shot of a baby racoon wearing an intricate italian priest robe. a photo of an astronaut
riding a horse on the moon. a painting of a fox in the snow, oil on canvas, highly detailed. portrait
of a woman with red hair, studio lighting, sharp focus. a city street at night in the rain, neon
lights, reflections. a bowl of fruit on a wooden table, still life. mountains and a lake at sunrise,
landscape photography. a cute cat sitting on a sofa. an old man reading a book by the window. the
quick brown fox jumps over the lazy dog. digital art of a castle in the clouds, fantasy, trending.
"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=False))


def build_vocab(num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's order: bytes, bytes + '</w>', merges, then the two special tokens."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    byte_map = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for w in CORPUS.lower().replace(".", " . ").replace(",", " , ").split():
        chars = [byte_map[b] for b in w.encode()]
        words[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        tokens.append(a + b)
        words = collections.Counter({_merge(w, a, b): c for w, c in words.items()})
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _merge(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
