"""A hub that cannot be reached, without HF_HUB_OFFLINE set (a new user's laptop on a train): every default model a
feature needs fails within 5 s, says why and names the local alternatives, instead of waiting out the libraries'
retries."""

from __future__ import annotations

import socket
import time

import pytest

from studio.models import hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The flag unset, the endpoint a closed local port, an empty Hugging Face cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(hub, "_probe", None)
    yield tmp_path
    hub._probe = None


def test_the_probe_decides_and_says_why(unreachable_hub, monkeypatch):
    start = time.monotonic()
    assert hub.offline() and not hub.reachable()
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S + 1
    assert "127.0.0.1 cannot be reached" in hub.offline_reason()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline() and "HF_HUB_OFFLINE=1" in hub.offline_reason()


def test_a_listening_endpoint_counts_as_reachable(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(hub, "_probe", None)
        assert hub.reachable() and not hub.offline()
    hub._probe = None


def _captioner(cache):
    from studio.dataset.captioning import DEFAULT_CAPTIONER, load_captioner

    load_captioner(DEFAULT_CAPTIONER, cache, device="cpu")


def _clip(cache):
    from studio.dataset.clipscore import DEFAULT_CLIP, load_clip_scorer

    load_clip_scorer(DEFAULT_CLIP, cache, device="cpu")


def _dino(cache):
    from studio.evaluate.encoders import DEFAULT_DINO, load_dino

    load_dino(DEFAULT_DINO, cache, device="cpu")


def _expander(cache):
    from studio.generation.expand import DEFAULT_EXPANDER, PromptExpander

    PromptExpander("cpu", cache).load(DEFAULT_EXPANDER)


@pytest.mark.parametrize("load", [_captioner, _clip, _dino, _expander], ids=["captioner", "clip", "dino", "expander"])
def test_default_models_fail_fast_naming_local_choices(unreachable_hub, load):
    # the libraries are imported already in the running app (diffusers brings them): time the decision, not imports
    import open_clip  # noqa: F401
    import transformers

    for name in ("AutoConfig", "BlipForConditionalGeneration", "ViTModel", "AutoModelForCausalLM"):
        getattr(transformers, name)
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        load(unreachable_hub / "cache")
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert elapsed < 5, f"{elapsed:.1f} s: {message}"
    assert "cannot be reached" in message and "demo-tiny" in message, message
