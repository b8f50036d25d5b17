"""Shared test setup."""

import pytest
import torch

# The tiny models are far too small for intra-op parallelism to pay off, and on a busy 2-core machine the extra
# threads only contend: one 28-token generate() took 35 s with the default thread count and 0.2 s with one thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's ``~/.cache/specdec``: measured forward costs (``budget="auto"``, a default
    of several drafters), layer sets and models go to one temporary folder for the whole session."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
