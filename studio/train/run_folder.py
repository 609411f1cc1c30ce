"""A training run's folder, `runs/<name>-<time>/`: config.yaml (enough to repeat the run), loss.csv, status.json,
checkpoints/step-NNNNNNNN/ (trained weights, optimizer state), previews/, embeddings/ copies. Every file that
matters is written atomically, so a killed run never leaves a half-written file under its final name."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.files.atomic import atomic_dir, write_text
from studio.files.names import check_name
from studio.files.pickles import unpickling_refusal
from studio.train.job import TrainJob, job_from_yaml, job_to_yaml

CONFIG, LOSS, STATUS = "config.yaml", "loss.csv", "status.json"
LOSS_FIELDS = ("step", "loss", "lr", "aux_loss", "seconds", "val_loss")  # val_loss: at validation steps only
CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    step: int
    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict | None
    info: dict
    extra: dict | None = None  # a method's other state (an EMA)


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    # 1. creating and opening

    @classmethod
    def create(cls, runs_dir: Path, job: TrainJob, when: dt.datetime | None = None) -> RunFolder:
        when = when or dt.datetime.now()
        # checked again: a run made by the Trainer directly (not through TrainJob.validate) still gets a folder name
        # that stays inside runs/ and works on every system
        base = Path(runs_dir) / check_name(f"{job.name}-{when.strftime('%Y%m%d-%H%M%S')}", "training run")
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        for sub in ("checkpoints", "previews"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        run = cls(path)
        write_text(path / CONFIG, job_to_yaml(job))
        write_text(path / LOSS, ",".join(LOSS_FIELDS) + "\n")
        return run

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ValueError(f"{path} is not a training run folder (no {CONFIG})")
        return cls(path)

    def job(self) -> TrainJob:
        return job_from_yaml((self.path / CONFIG).read_text(encoding="utf-8"), str(self.path / CONFIG))

    def save_job(self, job: TrainJob) -> None:
        write_text(self.path / CONFIG, job_to_yaml(job))

    # 2. loss log

    def append_losses(self, rows: list[dict]) -> None:
        """Append rows (a log: a crash may cut the last line, which resume removes)."""
        if not rows:
            return
        with open(self.path / LOSS, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, LOSS_FIELDS)
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in LOSS_FIELDS})
            f.flush()
            os.fsync(f.fileno())

    def losses(self) -> list[dict]:
        path = self.path / LOSS
        if not path.is_file():
            return []
        rows = []
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
            try:
                rows.append({"step": int(row["step"]), "loss": float(row["loss"]), "lr": float(row["lr"] or 0),
                             "aux_loss": float(row["aux_loss"]) if row.get("aux_loss") else None,
                             "val_loss": float(row["val_loss"]) if row.get("val_loss") else None})
            except (TypeError, ValueError, KeyError):
                continue  # a line cut by a crash
        return rows

    def truncate_losses(self, last_step: int) -> None:
        """Keep the log up to `last_step` (the checkpoint a resumed run continues from)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, LOSS_FIELDS)
        writer.writeheader()
        path = self.path / LOSS
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))) if path.is_file() else []:
            try:
                if int(row["step"]) <= last_step and row.get("seconds") is not None:
                    writer.writerow({k: row.get(k, "") for k in LOSS_FIELDS})
            except (TypeError, ValueError, KeyError):
                continue
        write_text(path, buf.getvalue())

    # 3. status (what the UI shows after a reload)

    def write_status(self, **status) -> None:
        status["updated"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        write_text(self.path / STATUS, json.dumps(status, indent=2, default=str))

    def status(self) -> dict:
        try:
            return json.loads((self.path / STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    # 4. checkpoints

    def checkpoints(self) -> list[tuple[int, Path]]:
        folder = self.path / "checkpoints"
        found = []
        for p in folder.iterdir() if folder.is_dir() else []:
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save_checkpoint(self, step: int, trainable: dict[str, torch.Tensor], optimizer: dict, info: dict,
                        keep: int, extra: dict | None = None) -> Path:
        """checkpoints/step-NNNNNNNN/ written as a whole (temporary folder, fsync, rename); then old ones pruned."""
        target = self.path / "checkpoints" / f"step-{step:08d}"
        with atomic_dir(target) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save(optimizer, tmp / "optimizer.pt")
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2, default=str))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self, path: Path | None = None) -> Checkpoint | None:
        """The given checkpoint, or the latest one; None when the run has none yet."""
        if path is None:
            found = self.checkpoints()
            if not found:
                return None
            path = found[-1][1]
        path = Path(path)
        try:
            info = json.loads((path / "state.json").read_text(encoding="utf-8"))
            step = int(info["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {path.name}: state.json is not readable ({e})") from e
        try:
            trainable = load_file(str(path / "trainable.safetensors"))
        except Exception as e:  # safetensors' own error types for a damaged header
            raise ValueError(f"checkpoint {path.name}: trainable.safetensors is not a valid safetensors file "
                             f"({e})") from e
        optimizer = extra = None
        if (path / "optimizer.pt").is_file():
            optimizer = _load_pickle(path / "optimizer.pt")
        if (path / "extra.pt").is_file():
            extra = _load_pickle(path / "extra.pt")
        return Checkpoint(step, path, trainable, optimizer, info, extra)

    # 5. previews

    def preview_path(self, step: int, sample: int = 1) -> Path:
        """previews/step-NNNNNNNN.png for the first sample prompt, step-NNNNNNNN-K.png for sample K > 1."""
        return self.path / "previews" / (f"step-{step:08d}.png" if sample == 1 else f"step-{step:08d}-{sample}.png")

    def previews(self) -> list[Path]:
        """Every preview, by step, then sample."""
        def order(path: Path) -> tuple[int, int]:
            step, _, sample = path.stem.removeprefix("step-").partition("-")
            return (int(step) if step.isdigit() else -1, int(sample) if sample.isdigit() else 1)

        return sorted((self.path / "previews").glob("step-*.png"), key=order)


def _load_pickle(path: Path):
    """Optimizer or EMA state: tensors and plain containers only (torch.load(weights_only=True)); a file that would
    run code when unpickled is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path.parent.name}: {unpickling_refusal(path, e)}") from e
    except Exception as e:
        raise ValueError(f"checkpoint {path.parent.name}: {path.name} is not readable ({type(e).__name__}: {e})") from e


def list_runs(runs_dir: Path) -> list[RunFolder]:
    """Run folders, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [RunFolder(p) for p in runs_dir.iterdir() if p.is_dir() and (p / CONFIG).is_file()]
    return sorted(runs, key=lambda r: (r.path / CONFIG).stat().st_mtime, reverse=True)
