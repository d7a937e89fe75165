"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest

from .cpp_client import build


@pytest.fixture(scope="session")
def cpp_request(tmp_path_factory):
    """engine/cpp/sdturbo_request, compiled once."""
    return build(tmp_path_factory.mktemp("cpp"))
