"""Hostile model files: pickles carrying a payload (os.system, open) in every folder the studio reads, and given
on the command line, are refused with a message and never run; the rest of the folder still works. safetensors
files with a lying header are refused cleanly. No unsafe deserializer anywhere in the package."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.config import StudioConfig
from studio.files.convert import save_single_file
from studio.files.networks import NetworkFileError, NetworkLibrary, read_tensor_file
from studio.models.checkpoints import ModelLoadError
from studio.models.manager import ModelManager
from studio.train.job import TrainJob
from studio.train.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
PICKLE_EXTS = (".pt", ".ckpt", ".bin", ".optim", ".pth")


class SystemPayload:
    """Unpickling this runs a shell command that creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpenPayload:
    """Unpickling this creates `marker` through open(): code, without a shell."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_hostile(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A weight file as people share them (a state dict with a tensor), carrying a payload among its values.
    `legacy`: a plain pickle stream (pre-1.6 torch.save), else torch's zip format."""
    data = {"state_dict": {"model.diffusion_model.w": torch.zeros(2), "x": SystemPayload(marker),
                           "y": OpenPayload(marker)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    return cfg


@pytest.fixture(scope="module")
def good_checkpoint(tiny_pipe, home):
    return save_single_file(tiny_pipe, home.models_dir / "good.safetensors", "sd1")


# --- pickles with a payload ------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, legacy", [(".ckpt", False), (".ckpt", True), (".pt", False), (".bin", True)])
def test_models_folder_refuses_payload_and_the_good_model_still_loads(home, good_checkpoint, tmp_path, ext,
                                                                        legacy):
    marker = tmp_path / "pwned"
    evil = write_hostile(home.models_dir / f"evil{ext}", marker, legacy)
    try:
        manager = ModelManager(home)
        manager.choices()  # the scan lists by name only
        with pytest.raises(ModelLoadError, match=rf"refused evil\{ext}: it asks to run Python code"):
            manager.load(evil.name)
        assert manager.load("good.safetensors").name == "good"
        assert not marker.exists()
    finally:
        evil.unlink()


def test_diffusers_folder_with_a_hostile_bin_is_refused_naming_the_file(tiny_pipe, home, tmp_path):
    marker = tmp_path / "pwned"
    folder = home.models_dir / "evil-diffusers"
    tiny_pipe.save_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_hostile(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    try:
        with pytest.raises(ModelLoadError, match="refused unet/diffusion_pytorch_model.bin: it asks to run"):
            ModelManager(home).load("evil-diffusers")
        assert not marker.exists()
    finally:
        shutil.rmtree(folder)


def test_diffusers_folder_naming_its_own_python_code_is_not_run(tiny_pipe, home, tmp_path):
    """model_index.json pointing a component at a .py file in the folder: diffusers refuses it (no
    trust_remote_code), the file is never imported."""
    marker = tmp_path / "pwned"
    folder = home.models_dir / "custom-code"
    tiny_pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["unet_evil", "EvilUNet"]}))
    (folder / "unet" / "unet_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom diffusers import UNet2DConditionModel as EvilUNet\n")
    try:
        with pytest.raises(ModelLoadError, match="custom code"):
            ModelManager(home).load("custom-code")
        assert not marker.exists()
    finally:
        shutil.rmtree(folder)


def test_model_flag_of_the_command_line_refuses_payload(home, tmp_path, capsys, monkeypatch):
    from studio.cli import main

    marker = tmp_path / "pwned"
    evil = write_hostile(tmp_path / "elsewhere" / "model.ckpt", marker)
    monkeypatch.setenv("STUDIO_HOME", str(home.models_dir.parent))
    code = main(["generate", "--model", str(evil), "--prompt", "x", "--steps", "1", "--width", "64",
                 "--height", "64", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "refused model.ckpt" in err and "safetensors" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_loras_and_embeddings_refuse_payload_in_every_pickle_format(home, tmp_path):
    """.pt/.ckpt are covered by test_networks; here .bin (read) and .optim/.pth (never opened by a scan), in both
    pickle formats, next to good files that still load."""
    marker = tmp_path / "pwned"
    save_file({"emb_params": torch.ones(1, 32)}, str(home.embeddings_dir / "fine.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(home.loras_dir / "fine.safetensors"))
    files = [write_hostile(folder / f"evil-{legacy:d}{ext}", marker, legacy)
             for folder in (home.loras_dir, home.embeddings_dir) for ext in (".bin", ".optim", ".pth")
             for legacy in (False, True)]
    try:
        library = NetworkLibrary(home.loras_dir, home.embeddings_dir)
        loras, embeddings = library.loras(), library.embeddings()
        for scan in (loras, embeddings):
            assert "fine" in scan.found
            for legacy in (0, 1):
                assert "refused" in scan.skipped[f"evil-{legacy}.bin"] and "posix.system" in scan.skipped[
                    f"evil-{legacy}.bin"]
        # opened on purpose (a user points at it), any extension is read the same safe way
        for f in files:
            with pytest.raises(NetworkFileError, match="refused"):
                read_tensor_file(f)
        assert not marker.exists()
    finally:
        for f in files:
            f.unlink()


@pytest.fixture
def resumable_run(tmp_path):
    """A training run folder as the trainer leaves it: config.yaml and one checkpoint at step 2."""
    import numpy as np
    from PIL import Image

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    data = cfg.datasets_dir / "dots"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
    job = TrainJob(name="dot-style", data="dots", resolution=64, max_steps=4, batch_size=1, save_every=2,
                   preview_every=0, init_word="painting", learning_rate="0.01")
    run = RunFolder.create(cfg.runs_dir, job)
    vectors = torch.zeros(1, 32)
    opt = torch.optim.AdamW([torch.nn.Parameter(vectors)])
    run.save_checkpoint(2, {"vectors": vectors}, opt.state_dict(), {"loss": 0.1}, keep=3)
    return cfg, run


@pytest.mark.parametrize("victim", ["optimizer.pt", "extra.pt"])
def test_resume_refuses_a_checkpoint_whose_pickles_carry_code(resumable_run, tmp_path, victim):
    from studio.train.loop import Trainer
    from studio.train.worker import TrainingWorker

    cfg, run = resumable_run
    marker = tmp_path / "pwned"
    step_dir = run.checkpoints()[-1][1]
    write_hostile(step_dir / victim, marker)
    with pytest.raises(ValueError, match=rf"checkpoint step-00000002: refused {victim}: it asks to run Python"):
        run.load_checkpoint()
    with pytest.raises(ValueError, match=f"refused {victim}"):
        Trainer(cfg).resume(run.path)
    worker = TrainingWorker(cfg)
    worker.resume(run.path)
    view = worker.wait(120)
    assert view.state == "failed" and f"refused {victim}" in view.message
    assert not marker.exists()


@pytest.mark.parametrize("ext", [".pth", ".ckpt", ".bin", ".pt"])
def test_controlnet_folder_refuses_payload(home, tmp_path, ext):
    """controlnet/ (storyboards): pickled ControlNet files are read as tensors only, a payload is refused."""
    from studio.control.controlnet import ControlNetLoader, list_controlnets

    marker = tmp_path / "pwned"
    evil = write_hostile(home.controlnet_dir / f"control_evil{ext}", marker)
    try:
        assert f"control_evil{ext}" in [e.name for e in list_controlnets(home.controlnet_dir)]
        with pytest.raises(ModelLoadError, match=rf"refused control_evil\{ext}: it asks to run Python code"):
            ControlNetLoader(home.controlnet_dir).load(evil.name, torch.device("cpu"), torch.float32, 32)
        assert not marker.exists()
    finally:
        evil.unlink()


def test_transformers_model_folders_refuse_payload(tmp_path):
    """Folders the user names as image encoder (TI-Att/MoE), DINO (evaluation) or captioner: transformers reads a
    pytorch_model.bin with weights_only=True; the studio says which file was refused."""
    from studio.dataset.captioning import CaptionerLoadError, load_captioner, tiny_blip_dir
    from studio.evaluate.encoders import EncoderLoadError, load_dino, tiny_dino_dir
    from studio.train.image_encoder import ImageEncoderError, load_image_encoder, tiny_image_encoder_dir

    cache = tmp_path / "cache"
    marker = tmp_path / "pwned"
    cases = [(tiny_image_encoder_dir, lambda f: load_image_encoder(str(f), cache), ImageEncoderError),
             (tiny_dino_dir, lambda f: load_dino(str(f), cache, "cpu"), EncoderLoadError),
             (tiny_blip_dir, lambda f: load_captioner(str(f), cache, "cpu"), CaptionerLoadError)]
    for make, load, error in cases:
        folder = tmp_path / make.__name__
        shutil.copytree(make(cache), folder)
        (folder / "model.safetensors").unlink()
        write_hostile(folder / "pytorch_model.bin", marker)
        with pytest.raises(error, match="refused pytorch_model.bin: it asks to run Python code"):
            load(folder)
    assert not marker.exists()


def test_clip_weights_file_with_payload_is_refused(tmp_path):
    """ARCH:/path/to/weights (CLIP scores, FID features): open_clip reads a pickle with weights_only=True; the
    studio names the file."""
    import open_clip

    from studio.dataset.clipscore import ClipLoadError, load_clip_scorer, tiny_clip_dir

    marker = tmp_path / "pwned"
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    cfg = json.loads((tiny_clip_dir(tmp_path / "cache") / "open_clip_config.json").read_text())["model_cfg"]
    (config_dir / "studio-tiny-sec.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir)
    evil = write_hostile(tmp_path / "clip_weights.bin", marker)
    with pytest.raises(ClipLoadError, match="refused clip_weights.bin: it asks to run Python code"):
        load_clip_scorer(f"studio-tiny-sec:{evil}", tmp_path / "cache", device="cpu")
    assert not marker.exists()


def test_model_folders_carrying_python_code_are_not_run(tmp_path, monkeypatch):
    """A folder whose config.json points transformers at its own modeling code (auto_map) is refused: the studio
    passes trust_remote_code=False, so nothing is imported and no "run the custom code? [y/N]" question can wait
    on the server's terminal."""
    from studio.dataset.captioning import CaptionerLoadError, load_captioner
    from studio.evaluate.encoders import EncoderLoadError, load_dino
    from studio.generation.expand import ExpandError, ExpandJob, PromptExpander

    marker = tmp_path / "pwned"
    folder = tmp_path / "custom"
    folder.mkdir()
    classes = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
               "AutoTokenizer": ["evil.EvilTokenizer", None], "AutoImageProcessor": "evil.EvilProcessor",
               "AutoProcessor": "evil.EvilProcessor"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": classes}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"auto_map": classes}))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal whether to run code"))
    with pytest.raises(CaptionerLoadError):
        load_captioner(str(folder), tmp_path / "cache", device="cpu")
    with pytest.raises(ExpandError):
        PromptExpander(device="cpu", cache_dir=tmp_path / "cache").expand(
            ExpandJob(prompt="a castle", model=str(folder), seed=1).validate())
    with pytest.raises(EncoderLoadError):
        load_dino(str(folder), tmp_path / "cache", "cpu")
    assert not marker.exists()


# --- safetensors with a lying header -----------------------------------------------------------------------


def _safetensors(header: dict, data: bytes, declared_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data


LYING = {
    # offsets that point past the end of the data
    "offsets-past-end": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16),
    # two tensors sharing the same bytes
    "overlapping": _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
    # a shape of 2^80 elements: nothing may try to allocate it
    "huge-shape": _safetensors({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                               b"\0" * 16),
    # a header length field claiming 2^60 bytes
    "huge-header": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16,
                                declared_len=2**60),
    # a dtype that does not exist, and one whose size does not match the bytes
    "unknown-dtype": _safetensors({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "dtype-size-mismatch": _safetensors({"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}},
                                        b"\0" * 16),
    # a negative / non-numeric shape
    "negative-shape": _safetensors({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "header-not-json": struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16,
    "truncated": _safetensors({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, b"\0" * 256)[:120],
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(LYING))
def test_lying_safetensors_are_refused_cleanly_everywhere(home, good_checkpoint, tmp_path, kind):
    blob = LYING[kind]
    paths = {folder: folder / f"lying-{kind}.safetensors"
             for folder in (home.models_dir, home.loras_dir, home.embeddings_dir)}
    for p in paths.values():
        p.write_bytes(blob)
    try:
        with pytest.raises(ModelLoadError, match=f"lying-{kind}.safetensors (is not a valid|is empty)"):
            ModelManager(home).load(f"lying-{kind}.safetensors")
        library = NetworkLibrary(home.loras_dir, home.embeddings_dir)
        for scan in (library.loras(), library.embeddings()):
            reason = scan.skipped[f"lying-{kind}.safetensors"]
            assert "not a valid safetensors file" in reason or "empty" in reason
        # a run's checkpoint with such a file is refused on resume, not half-loaded
        run_dir = tmp_path / "run"
        ckpt = run_dir / "checkpoints" / "step-00000002"
        ckpt.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("studio_train: 1\njob: {name: x, data: y}\n")
        (ckpt / "state.json").write_text('{"step": 2}')
        (ckpt / "trainable.safetensors").write_bytes(blob)
        with pytest.raises(ValueError, match="trainable.safetensors is not a valid safetensors file"):
            RunFolder.open(run_dir).load_checkpoint()
    finally:
        for p in paths.values():
            p.unlink()


# --- the code itself ------------------------------------------------------------------------------------------


def _python_files() -> list[Path]:
    files = [ROOT / "app.py", *sorted((ROOT / "studio").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py"))]
    return [f for f in files if f.is_file()]


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle/dill/joblib loads,
    numpy loads with allow_pickle=True, yaml.load / yaml.unsafe_load, torch.hub loads without weights_only."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}

        def is_true(key, kw=kw):
            return isinstance(kw.get(key), ast.Constant) and kw[key].value is True

        if name.endswith(("torch.load", "load_state_dict_from_url")) and not is_true("weights_only"):
            found.append((node.lineno, name))
        elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load",
                      "cloudpickle.loads", "pickle.Unpickler", "marshal.loads", "shelve.open"):
            found.append((node.lineno, name))
        elif name.endswith(("np.load", "numpy.load")) and is_true("allow_pickle"):
            found.append((node.lineno, name))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append((node.lineno, name))
        elif name in ("eval", "exec"):
            found.append((node.lineno, name))
        else:
            # transformers' Auto* classes import a folder's own modeling code unless told not to
            no_code = isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is False
            auto = name.startswith("Auto") and not name.startswith("Autoencoder")
            if ("trust_remote_code" in kw or (auto and name.endswith(".from_pretrained"))) and not no_code:
                found.append((node.lineno, f"{name} without trust_remote_code=False"))
    return found


def test_no_unsafe_deserialization_in_the_package():
    bad = []
    for f in _python_files():
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        bad += [f"{f.relative_to(ROOT)}:{line}: {name}" for line, name in _unsafe_calls(tree)]
        # `from torch import load` or `from pickle import loads` would hide the calls from the check above
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
                names = {a.name for a in node.names}
                if names & {"load", "loads", "Unpickler"}:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: from {node.module} import {names}")
    assert bad == [], "unsafe deserialization:\n" + "\n".join(bad)


def test_the_guard_catches_what_it_claims():
    code = ("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
            "pickle.loads(b)\nyaml.load(t)\nyaml.safe_load(t)\nnp.load(p, allow_pickle=True)\neval(s)\n"
            "AutoModel.from_pretrained(p)\nAutoModel.from_pretrained(p, trust_remote_code=False)\n"
            "CLIPModel.from_pretrained(p, trust_remote_code=True)\n")
    assert [line for line, _ in _unsafe_calls(ast.parse(code))] == [1, 2, 4, 5, 7, 8, 9, 11]
