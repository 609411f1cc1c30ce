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
    from studio.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def tiny_pipe_sd2():
    from studio.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd2")


@pytest.fixture
def studio_cfg(tmp_path):
    """A StudioConfig whose user folders live in a fresh temporary folder."""
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    return cfg


def launch_app(home, root):
    """`python app.py --model demo-tiny` on a free port with `home` as its studio home, as users start it.

    A generator for module fixtures: yields the URL once the port answers, stops the app afterwards."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(home / "app.log", "w")
    # on demo-tiny, not the default micro model: the browser tests' LoRAs and embeddings are made for demo-tiny
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--home", str(home), "--model", "demo-tiny"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {(home / 'app.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start in 180 s")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def shared_app(request, tmp_path_factory):
    """One `python app.py` (launch_app) for the browser modules whose tests work in names of their own and do not
    look at each other's files: the storyboard, dataset, survey and train tabs. Each app start costs ~14 s of CPU
    (torch, diffusers, gradio), so they share one instead of starting four. Yields (url, home).

    Before the app starts, every collected module that uses this fixture and defines `prepare_shared_home(home)`
    puts its files into the home (a dataset, a ControlNet), as users drop them into those folders."""
    home = tmp_path_factory.mktemp("shared-app-home")
    modules = {item.module for item in request.session.items if "shared_app" in getattr(item, "fixturenames", ())}
    for module in sorted(modules, key=lambda m: m.__name__):
        prepare = getattr(module, "prepare_shared_home", None)
        if prepare is not None:
            prepare(home)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for url in launch_app(home, root):
        yield url, home


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    """Headless Debian Chromium driven by playwright; the test is skipped where it is not installed."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            yield chromium
        finally:
            chromium.close()
