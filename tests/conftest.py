"""Shared fixtures: offline, seeded tiny models built in code, a throwaway studio home."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The demo-tiny SD 1.x pipeline (do not mutate it; build your own if you must)."""
    from studio.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def tiny_pipe_sd2():
    from studio.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd2")


@pytest.fixture
def studio_cfg(tmp_path):
    """A StudioConfig whose user folders live in a fresh temporary folder."""
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    return cfg
