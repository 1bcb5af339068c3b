"""Where tests find the repository and the shared data, and the one rule for tests that need that data.

The traces live in ../shared/data beside the checkout (DESIGN.md: read them from there). A test that needs
one asks `shared_data(...)`: on a developer's machine without shared/ it skips, naming the missing file;
where PDO_REQUIRE_SHARED_DATA=1 (CI sets it) a missing file fails the test instead, so CI cannot go green
by skipping them.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """The path of `relative` under ../shared/data; skip (or fail, under PDO_REQUIRE_SHARED_DATA=1) when absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"needs the shared data file {path} (../shared/data beside the checkout)"
        if os.environ.get("PDO_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
