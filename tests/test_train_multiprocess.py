"""Training on several processes (issue 10, "beyond one GPU"): the studio's trainer under torch.distributed, here two
CPU processes with the gloo backend (the same accelerate code path as two GPUs with NCCL, which CI does not have).

Two processes at batch 1 draw micro-batches 2k and 2k+1 of step k+1 (process index = rank), which is what one process
draws with 2 accumulation steps, and accelerate averages their gradients as accumulation does. So the two runs must
end with the same file up to float rounding, and only the first process may write it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_ti import ROOT, home_cfg, run_main

COMMON = ["--data", "stripes", "--steps", "4", "--resolution", "64", "--preview-every", "0", "--save-every", "2",
          "--batch-size", "1", "--seed", "3", "--model", "demo-tiny"]
CASES = {
    "ti": (["train", "ti", "--name", "two-style", "--lr", "0.05"], "embeddings", "two-style.safetensors"),
    "lora": (["train", "lora", "--name", "two-lora", "--rank", "2", "--unet-lr", "1e-2"], "loras",
             "two-lora.safetensors"),
}


def run_two_processes(args: list[str], home) -> subprocess.CompletedProcess:
    env = {**os.environ, "STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "studio", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", list(CASES))
def test_two_processes_train_what_one_process_with_two_accumulation_steps_trains(method, tmp_path, monkeypatch,
                                                                                   capsys):
    args, folder, file = CASES[method]
    two_home, one_home = tmp_path / "two", tmp_path / "one"
    home_cfg(tmp_path, "two"), home_cfg(tmp_path, "one")
    two = run_two_processes([*args, *COMMON, "--grad-accum", "1"], two_home)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_main([*args, *COMMON, "--grad-accum", "2"], one_home, monkeypatch, capsys)
    assert one.returncode == 0, one.stderr
    a, b = load_file(str(two_home / folder / file)), load_file(str(one_home / folder / file))
    assert a.keys() == b.keys()
    for key in a:
        # float rounding of the gradient average; LoRA files are fp16 (one step of fp16 is ~1e-3 relative)
        tol = dict(atol=1e-4, rtol=2e-3) if a[key].dtype == torch.float16 else dict(atol=1e-5, rtol=1e-4)
        assert torch.allclose(a[key].float(), b[key].float(), **tol), key
    # one run folder, written by the first process only; it logged the losses of the one-process run (each step's
    # loss averaged over both processes) and its file of step 2 differs from the final one (it did train)
    runs = [p for p in (two_home / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    (one_run,) = [p for p in (one_home / "runs").iterdir() if p.is_dir()]
    assert losses(runs[0]) == pytest.approx(losses(one_run), abs=1e-4) and len(losses(one_run)) == 4
    (step2,) = runs[0].glob("*/*-2.safetensors")
    middle = load_file(str(step2))
    assert any(not torch.allclose(middle[k].float(), a[k].float()) for k in a)


def losses(run) -> list[float]:
    rows = list(csv.DictReader((run / "loss.csv").open(encoding="utf-8")))
    return [float(r["loss"]) for r in rows]
