import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_flushed_denormals():
    """A benchmark's smoke run flushes denormals (process-wide state): set it back after each
    test, so later tests (hypothesis refuses to draw floats with it on) see IEEE arithmetic."""
    yield
    torch.set_flush_denormal(False)
