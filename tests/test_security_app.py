"""The launched app (app.py's own create_app and launch options, served in this process so that faults can be
injected): login required with --auth, browser file access limited to outputs/ and runs/, model names from the API
kept inside models/, a hostile --model refused at start, two sessions generating while a training run works (GPU
work serialized, each its own results, no LoRA leaking between them), and out-of-memory answered with advice
while the app keeps serving."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

import app as app_module

USER, PASSWORD = "ana", "correct horse"


def gen(prompt: str, seed: int, batch_size: int = 1) -> list:
    """/generate's inputs in order: prompt, negative, sampler, schedule, steps, CFG, seed, width, height, batch size,
    batch count, clip skip."""
    return [prompt, "", "Euler", "Automatic", 2, 7, seed, 64, 64, batch_size, 1, 1]


def _home(home: Path) -> None:
    """A LoRA for demo-tiny, a hostile checkpoint in models/, a small dataset, an outputs image and a secret."""
    from test_security_files import write_hostile

    for sub in ("loras", "models", "outputs", "datasets/dots"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(2, 32, generator=g) * 2,
               f"{layer}.lora_up.weight": torch.randn(32, 2, generator=g) * 2, f"{layer}.alpha": torch.tensor(2.0)},
              str(home / "loras" / "inkwash.safetensors"))
    write_hostile(home / "models" / "evil.ckpt", home / "pwned")
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 + 80 * i, np.uint8)).save(home / "datasets" / "dots" / f"{i}.png")
    Image.new("RGB", (8, 8), "red").save(home / "outputs" / "shown.png")
    (home / "models" / "secret.txt").write_text("not for the browser")
    os.symlink("/etc/passwd", home / "outputs" / "link.png")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, home, state, startup stderr) of `python app.py --auth ana:... --model evil.ckpt`, in this process."""
    home = tmp_path_factory.mktemp("home")
    _home(home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = app_module.parse_args(["--port", str(port), "--home", str(home), "--model", "evil.ckpt", "--auth",
                                  f"{USER}:{PASSWORD}"])
    network, warnings = app_module.network_options(args)
    assert network["server_name"] == "127.0.0.1" and not warnings
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        demo, launch, state = app_module.create_app(args, network)
    demo.launch(**launch, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", home, state, err.getvalue()
    finally:
        state.trainer.stop()
        state.trainer.wait(60)
        demo.close()


def logged_in(url: str) -> requests.Session:
    session = requests.Session()
    r = session.post(f"{url}/login", data={"username": USER, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return session


def client(url: str):
    from gradio_client import Client

    return Client(url, auth=(USER, PASSWORD), verbose=False)


def test_hostile_model_flag_is_refused_at_start_and_the_app_opens_on_demo_tiny(served):
    url, home, state, startup = served
    assert "refused evil.ckpt: it asks to run Python code" in startup and "starting on demo-tiny" in startup
    assert state.manager.current.name == "demo-tiny"
    assert not (home / "pwned").exists()


def test_login_is_required(served):
    url, *_ = served
    assert requests.get(f"{url}/config").status_code == 401
    assert requests.post(f"{url}/login", data={"username": USER, "password": "wrong"}).status_code == 400
    assert logged_in(url).get(f"{url}/config").status_code == 200
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(url, verbose=False)  # no credentials, no API


def test_browser_can_fetch_outputs_and_nothing_else(served):
    url, home, *_ = served
    session = logged_in(url)

    def get(path):
        return session.get(f"{url}/gradio_api/file={path}").status_code

    assert requests.get(f"{url}/gradio_api/file={home / 'outputs' / 'shown.png'}").status_code == 401
    assert get(home / "outputs" / "shown.png") == 200
    for path in ("/etc/passwd", home / "models" / "secret.txt", home / "models" / "evil.ckpt",
                 f"{home}/outputs/../models/secret.txt", home / "outputs" / "link.png",
                 Path(app_module.__file__).resolve()):
        assert get(path) == 403, path


def test_model_names_from_the_api_stay_inside_models(served):
    url, home, state, _ = served
    c = client(url)
    for name in ("/etc/passwd", "../../etc/passwd", "..\\..\\x.safetensors", str(home / "models" / "evil.ckpt"),
                 "evil.ckpt"):
        # Gradio checks a dropdown's value against its choices; a listed hostile file is refused by the loader
        with pytest.raises(Exception, match="is not in the list of choices|refused evil.ckpt"):
            c.predict(name, api_name="/load_model")
        assert state.manager.current.name == "demo-tiny"
    assert not (home / "pwned").exists()


def _gallery_image(gallery) -> np.ndarray:
    item = gallery[0]
    path = item["image"] if isinstance(item, dict) and "image" in item else item
    path = path.get("path", path) if isinstance(path, dict) else path
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_two_sessions_generate_while_training_runs(served, monkeypatch):
    from studio.generation import generate
    from studio.train.job import TrainJob

    url, home, state, _ = served
    passes, lock = [], threading.Lock()
    original = generate.denoise

    def timed(*args, **kw):
        start = time.monotonic()
        try:
            return original(*args, **kw)
        finally:
            with lock:
                passes.append((start, time.monotonic()))

    monkeypatch.setattr(generate, "denoise", timed)
    state.trainer.start(TrainJob(name="dots-style", data="dots", resolution=64, max_steps=100_000,
                                 preview_every=0, save_every=100_000, init_word="painting", batch_size=1))
    deadline = time.time() + 60
    while state.trainer.view().step < 1 and time.time() < deadline:
        time.sleep(0.1)
    step_before = state.trainer.view().step
    assert step_before >= 1 and state.trainer.busy

    requests_ = {"a": [("a lighthouse <lora:inkwash:1>", 5), ("a harbour <lora:inkwash:1>", 6)],
                 "b": [("a lighthouse", 5), ("a meadow", 7)]}
    results: dict[str, list] = {"a": [], "b": []}
    errors = []

    def session(key):
        try:
            c = client(url)  # one client = one browser session
            for prompt, seed in requests_[key]:
                results[key].append(c.predict(*gen(prompt, seed), api_name="/generate"))
        except Exception as e:  # reported below, with the thread's name
            errors.append((key, e))

    threads = [threading.Thread(target=session, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    # the training run kept working meanwhile, in its own lane
    assert state.trainer.busy and state.trainer.view().step > step_before
    state.trainer.stop()
    assert state.trainer.wait(120).state == "stopped"
    # GPU work was serialized: no two denoising passes overlapped
    passes.sort()
    assert len(passes) == 4
    assert all(later[0] >= earlier[1] for earlier, later in zip(passes, passes[1:], strict=False)), passes
    # each session got its own images, with its own prompt and seed in the parameters
    for key in ("a", "b"):
        for (prompt, seed), (_, _, infotext) in zip(requests_[key], results[key], strict=True):
            assert infotext.startswith(prompt) and f"Seed: {seed}," in infotext
    # no shared state leaked: b's plain prompt gives the image it gives alone, a's LoRA changed a's image
    alone = client(url).predict(*gen("a lighthouse", 5), api_name="/generate")
    assert np.array_equal(_gallery_image(results["b"][0][0]), _gallery_image(alone[0]))
    assert not np.array_equal(_gallery_image(results["a"][0][0]), _gallery_image(alone[0]))


def test_out_of_memory_is_a_message_and_the_app_keeps_serving(served, monkeypatch):
    from studio.generation import generate

    url, *_ = served
    original, calls = generate.denoise, {"n": 0}

    def oom_once(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kw)

    monkeypatch.setattr(generate, "denoise", oom_once)
    c = client(url)
    with pytest.raises(Exception, match="ran out of GPU memory.*Memory was freed.*Try .*VAE tiling"):
        c.predict(*gen("a lighthouse", 1, batch_size=2), api_name="/generate")
    gallery, _, infotext = c.predict(*gen("a lighthouse", 1), api_name="/generate")
    assert len(gallery) == 1 and "Seed: 1," in infotext


def test_stop_in_one_session_does_not_stop_another_sessions_generation(served, monkeypatch):
    from studio.generation import generate

    url, *_ = served
    original, started = generate.denoise, threading.Event()

    def slow(pipe, items, *args, on_step=None, cancel=None, **kw):
        def step(done, n):
            started.set()
            time.sleep(0.05)  # a long pass, so a Stop can arrive while it runs
            if on_step:
                on_step(done, n)

        return original(pipe, items, *args, on_step=step, cancel=cancel, **kw)

    monkeypatch.setattr(generate, "denoise", slow)
    mine, other = client(url), client(url)
    args = ["a lighthouse", "", "Euler", "Automatic", 30, 7, 3, 64, 64, 1, 1, 1]
    job = mine.submit(*args, api_name="/generate")
    assert started.wait(60)
    other.predict(api_name="/stop")  # another browser tab presses Stop
    _, seed_md, _ = job.result(timeout=120)
    assert "stopped" not in seed_md
    started.clear()
    job = mine.submit(*args, api_name="/generate")
    assert started.wait(60)
    mine.predict(api_name="/stop")  # this tab's own Stop ends its run at the next step
    _, seed_md, _ = job.result(timeout=120)
    assert "stopped during batch 1/1" in seed_md


def test_the_api_gets_refusals_not_rounded_numbers_and_a_huge_prompt_is_refused_at_once(served, monkeypatch):
    """The probes of /generate: 2.7 steps ran as 2, width 71.9 as 71, batch 1.5 as 1, steps=true as 1 step,
    schedule=None crashed, and a 1 MB prompt held the GPU lane for 72 s. Each is now a refusal naming the field or
    the limit, and nothing reaches the denoiser."""
    from studio.generation import generate

    url, *_ = served
    passes = []
    original = generate.denoise
    monkeypatch.setattr(generate, "denoise", lambda *a, **kw: passes.append(1) or original(*a, **kw))
    c = client(url)
    for index, value, message in ((4, 2.7, "steps must be a whole number, got 2.7"),
                                  (7, 71.9, "width must be a whole number, got 71.9"),
                                  (9, 1.5, "batch size must be a whole number, got 1.5"),
                                  (4, True, "steps must be a whole number, got True"),
                                  (3, None, "schedule type must be text, got None"),
                                  (6, 2.5, "seed must be a whole number, got 2.5")):
        inputs = gen("a lighthouse", 1)
        inputs[index] = value
        with pytest.raises(Exception, match=message):
            c.predict(*inputs, api_name="/generate")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"prompt is 1,050,000 characters; the limit is 20,000 \(max_prompt_chars\)\. "
                                        r"For a local run, raise it with STUDIO_LIMIT_MAX_PROMPT_CHARS="):
        c.predict(*gen("a red circle, " * 75000, 1), api_name="/generate")
    assert time.monotonic() - start < 10
    assert passes == []
    gallery, _, infotext = c.predict(*gen("a lighthouse", 1), api_name="/generate")  # whole values still run
    assert len(gallery) == 1 and "Steps: 2," in infotext and passes == [1]
