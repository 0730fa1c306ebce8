"""Shared test setup."""
import os

# Never reach the network for model weights (timm/diffusers/torch-fidelity look here).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference statistics and feature classifiers go to a per-session folder, not ~/.cache."""
    old = os.environ.get("ABLATE_CACHE")
    os.environ["ABLATE_CACHE"] = str(tmp_path_factory.mktemp("ablate-cache"))
    yield
    if old is None:
        os.environ.pop("ABLATE_CACHE", None)
    else:
        os.environ["ABLATE_CACHE"] = old


from tests.study_fixture import study  # noqa: E402,F401  (a tiny real study, shared)


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    """One intra-op thread (restored afterwards) and $ABLATE_CACHE in this test's own folder."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(threads)
