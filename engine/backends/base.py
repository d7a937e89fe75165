"""What the pipeline asks of a backend: one callable stage per component, numpy in and out."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..bundle import Bundle


class Stage(Protocol):
    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """Run the component on host arrays named as its spec's inputs; return its single output."""


class Backend(Protocol):
    name: str
    precision: str

    def load(self, bundle: Bundle, component: str) -> Stage:
        """Load ``component`` of ``bundle`` (checked against the manifest); slow, done once."""
