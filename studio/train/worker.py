"""The background worker for training runs: one run at a time in its own thread, outliving the browser tab.
The UI polls `view()`; after a page reload (or a restart of the studio) the view is rebuilt from the run folder."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.config import StudioConfig
from studio.files.names import UnsafeNameError, check_name, safe_child
from studio.models.tokenizer import clip_tokenizer
from studio.train.data import resolve_data_dir
from studio.train.job import TrainJob
from studio.train.loop import Trainer, check_compile_device, method_class
from studio.train.run_folder import RunFolder, list_runs
from studio.train.textual_inversion import check_token_name

LOG_LINES = 200


@dataclass
class RunView:
    """Everything the Train tab shows about one run."""

    state: str = "idle"  # idle, starting, running, stopped, failed, finished, interrupted
    run_dir: str | None = None
    name: str = ""
    method: str = ""
    step: int = 0
    max_steps: int = 0
    progress: str = ""  # "step 120/1000 · loss 0.1234 · 3.1 steps/s · ETA 4:43"
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # the held-out images' loss, when validated
    previews: list[str] = field(default_factory=list)  # image paths, oldest first
    log: list[str] = field(default_factory=list)
    message: str = ""
    embedding: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")


def view_from_folder(run: RunFolder, live: bool = False) -> RunView:
    """A run as its folder tells it (status.json, loss.csv, previews, train.log)."""
    status = run.status()
    job = run.job()
    state = status.get("state", "interrupted")
    if state == "running" and not live:
        state = "interrupted"  # its process ended without saying so (closed, killed): resume continues it
    log_path = run.path / "train.log"
    log = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_LINES:] if log_path.is_file() else []
    message = status.get("message", "")
    if state == "interrupted":
        last = run.checkpoints()
        message = ("the run ended without finishing (the studio was closed or the process killed); "
                   + (f"resume continues from step {last[-1][0]}" if last else "no checkpoint was saved yet"))
    return RunView(state=state, run_dir=str(run.path), name=job.name, method=job.method,
                   step=int(status.get("step", 0)), max_steps=job.max_steps, progress="",
                   losses=[(r["step"], r["loss"]) for r in run.losses()],
                   val_losses=[(r["step"], r["val_loss"]) for r in run.losses() if r.get("val_loss") is not None],
                   previews=[str(p) for p in run.previews()], log=log, message=message,
                   embedding=status.get("output") or status.get("embedding"))


class TrainingWorker:
    """Starts, stops and reports training runs; one at a time."""

    def __init__(self, cfg: StudioConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._view = RunView()

    # 1. control

    def start(self, job: TrainJob) -> RunView:
        """Check the job now (a bad value is a ValueError here, not a failed run later), then train in the
        background."""
        job.validate(self.cfg.limits)
        resolve_data_dir(job.data, self.cfg.datasets_dir)
        if job.method == "finetune" and job.output:
            # from the browser (or its API) the checkpoint goes into models/, never elsewhere on the disk; the
            # command line (Trainer directly) may write where its user says
            output = Path(job.output)
            check_name(output.name, "fine-tuned checkpoint file")
            inside = output.resolve() if output.is_absolute() else safe_child(self.cfg.models_dir, job.output)
            if Path(self.cfg.models_dir).resolve() not in inside.parents:
                raise UnsafeNameError(f"the output file must be inside {Path(self.cfg.models_dir).name}/, got "
                                      f"{job.output!r}")
            job = job.replace(output=str(inside))
        method_class(job).check_output(self.cfg, job)
        cuda = self.cfg.device == "cuda" or (self.cfg.device == "auto" and torch.cuda.is_available())
        if not cuda and job.mixed_precision == "fp16":
            raise ValueError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on this device")
        if not cuda and job.optimizer == "adamw8bit":
            raise ValueError("8-bit AdamW needs a CUDA GPU (bitsandbytes); use adamw on this device")
        device = "cuda" if cuda else "cpu" if self.cfg.device == "auto" else self.cfg.device
        check_compile_device(job.compile, device)
        if job.is_ti:  # SD 1.x and 2.x share CLIP's vocabulary: the name check needs no model
            check_token_name(clip_tokenizer("sd1"), job.name)
        return self._launch(lambda trainer: trainer.start(job), job.name, job.method, job.max_steps)

    def resume(self, run_dir: Path, max_steps: int | None = None) -> RunView:
        run = RunFolder.open(run_dir)
        job = run.job()
        return self._launch(lambda trainer: trainer.resume(run.path, max_steps), job.name, job.method,
                            max_steps or job.max_steps, run.path)

    def stop(self) -> str:
        if not self.busy:
            return "no training run is going"
        self._cancel.set()
        return "stopping at the next step (a checkpoint and the embedding so far are saved)"

    def wait(self, timeout: float | None = None) -> RunView:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.view()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # 2. reporting

    def view(self) -> RunView:
        """The live run, else the last one of this session, else the newest run folder on disk."""
        with self._lock:
            if self._view.state != "idle":
                return _copy(self._view)
        runs = list_runs(self.cfg.runs_dir)
        return view_from_folder(runs[0]) if runs else RunView()

    def runs(self) -> list[RunFolder]:
        return list_runs(self.cfg.runs_dir)

    # 3. the thread

    def _launch(self, work, name: str, method: str, max_steps: int, run_dir: Path | None = None) -> RunView:
        with self._lock:
            if self.busy:
                raise RuntimeError(f"a training run is going ({self._view.name}); stop it or wait for it to end")
            self._cancel = threading.Event()
            self._view = RunView(state="starting", name=name, method=method, max_steps=max_steps,
                                 run_dir=str(run_dir) if run_dir else None, message="starting")
            if run_dir is not None:
                old = view_from_folder(RunFolder(run_dir), live=True)
                self._view.losses, self._view.previews = old.losses, old.previews
                self._view.val_losses = old.val_losses
            trainer = Trainer(self.cfg, on_progress=self._on_progress, on_event=self._on_event, cancel=self._cancel)
            self._thread = threading.Thread(target=self._work, args=(work, trainer), name="studio-training",
                                            daemon=True)
            self._thread.start()
            return _copy(self._view)

    def _work(self, work, trainer: Trainer) -> None:
        try:
            result = work(trainer)
            with self._lock:
                self._view.state = result.state
                self._view.message = result.message
                self._view.run_dir = str(result.run_dir)
                self._view.embedding = str(result.embedding) if result.embedding else None
        except Exception as e:  # a bad dataset, a model that fails to load: shown, never lost in a thread
            with self._lock:
                self._view.state = "failed"
                self._view.message = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
                self._view.log.append(self._view.message)

    def _on_progress(self, done: int, total: int, info: str) -> None:
        with self._lock:
            self._view.step, self._view.max_steps, self._view.progress = done, total, info
            if self._view.state == "starting" and done > 0:
                self._view.state = "running"

    def _on_event(self, kind: str, info: dict) -> None:
        with self._lock:
            view = self._view
            if kind == "loss":
                view.losses.append((info["step"], info["loss"]))
                if info.get("val_loss") is not None:
                    view.val_losses.append((info["step"], info["val_loss"]))
                view.state = "running"
            elif kind == "preview":
                view.previews.append(info["path"])
            elif kind == "log":
                view.log.append(f"{time.strftime('%H:%M:%S')} {info['text']}")
                del view.log[:-LOG_LINES]
            elif kind == "run":
                view.run_dir = info["path"]
                view.state = "running"


def _copy(view: RunView) -> RunView:
    return RunView(**{**view.__dict__, "losses": list(view.losses), "val_losses": list(view.val_losses),
                      "previews": list(view.previews), "log": list(view.log)})
