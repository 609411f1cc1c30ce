"""With --auth every route that acts on a job needs the login (Gradio 6 leaves /cancel, /reset, /stream and others
open; studio.ui.access closes them), and --host picks the address, still needing --auth beyond loopback."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests
from test_security_app import client, logged_in, served  # noqa: F401 (served: the fixture)

import app as app_module
from studio.ui.access import is_public


def _routes(app):
    """(methods, path) of every route of the served app, included routers opened."""
    def walk(routes):
        for r in routes:
            if hasattr(r, "original_router"):
                yield from walk(r.original_router.routes)
            elif hasattr(r, "path"):
                yield r
    return [(sorted(getattr(r, "methods", None) or ["GET"]), r.path) for r in walk(app.routes)]


def test_cancel_and_reset_without_login_are_refused_and_the_run_goes_on(served, monkeypatch):  # noqa: F811
    from studio.generation import generate

    url, *_ = served
    original, started = generate.denoise, threading.Event()

    def slow(pipe, items, *args, on_step=None, cancel=None, **kw):
        def step(done, n):
            started.set()
            time.sleep(0.05)
            if on_step:
                on_step(done, n)

        return original(pipe, items, *args, on_step=step, cancel=cancel, **kw)

    monkeypatch.setattr(generate, "denoise", slow)
    mine = client(url)
    job = mine.submit("a lighthouse", "", "Euler", "Automatic", 30, 7, 3, 64, 64, 1, 1, 1, api_name="/generate")
    assert started.wait(60)
    event_ids = list(mine.pending_event_ids)
    assert event_ids
    for fn_index in range(40):  # whichever index /generate has: none may be cancelled without the login
        body = {"session_hash": mine.session_hash, "fn_index": fn_index, "event_id": event_ids[0]}
        for route in ("cancel", "reset"):
            r = requests.post(f"{url}/gradio_api/{route}", json=body)
            assert r.status_code == 401, (route, r.status_code, r.text)
    _, seed_md, _ = job.result(timeout=120)
    assert "stopped" not in seed_md  # the logged-in user's run finished


def test_every_route_but_the_login_page_needs_the_login(served):  # noqa: F811
    url, *_ = served
    session = logged_in(url)
    assert requests.get(f"{url}/config").status_code == 401
    import gc

    from gradio.routes import App

    # the route table of the app launch() built (the fixture keeps no handle on it)
    served_apps = [o for o in gc.get_objects() if isinstance(o, App) and getattr(o, "auth", None)]
    assert served_apps, "the served app was not found"
    checked = 0
    for methods, path in _routes(served_apps[-1]):
        concrete = re.sub(r"\{[^}]+\}", "x", path).replace("{", "").replace("}", "")
        for method in methods:
            if method == "HEAD":
                continue
            if is_public(path):
                continue
            r = requests.request(method, f"{url}{concrete}", json={}, timeout=10, allow_redirects=False)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            checked += 1
    assert checked > 30
    # the same routes answer a logged-in browser (the middleware lets the login through)
    assert session.get(f"{url}/gradio_api/info").status_code == 200
    with session.get(f"{url}/gradio_api/heartbeat/x", stream=True, timeout=10) as beat:  # an endless stream
        assert beat.status_code == 200
    # and the login page still loads for someone logged out
    assert requests.get(f"{url}/").status_code == 200
    assert requests.get(f"{url}/gradio_api/login_check").status_code == 401  # Gradio's own answer


@pytest.mark.parametrize("argv, host", [([], "127.0.0.1"), (["--listen", "--auth", "a:b"], "0.0.0.0"),
                                        (["--host", "192.168.1.20", "--auth", "a:b"], "192.168.1.20"),
                                        (["--host", "::1"], "::1"), (["--host", "localhost"], "localhost"),
                                        (["--host", "10.0.0.5", "--insecure-no-auth"], "10.0.0.5")])
def test_host_picks_the_address(argv, host):
    options, _ = app_module.network_options(app_module.parse_args(argv))
    assert options["server_name"] == host


@pytest.mark.parametrize("argv, message", [
    (["--host", "192.168.1.20"], "--host 192.168.1.20 lets other machines open the studio: add --auth"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines"),
    (["--host", "example.org", "--auth", "a:b"], "--host must be an IP address"),
    (["--listen", "--host", "10.0.0.1", "--auth", "a:b"], "--listen means --host 0.0.0.0"),
])
def test_host_beyond_loopback_needs_a_login(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        app_module.network_options(app_module.parse_args(argv))
