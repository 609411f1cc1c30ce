"""What the UI holds for the whole process: the config, the model owner, the generator, the training worker,
Stop events."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.config import StudioConfig
from studio.generation.expand import PromptExpander
from studio.generation.generate import Generator
from studio.models.manager import ModelManager
from studio.train.worker import TrainingWorker

DEFAULT_PREVIEW_EVERY = 5  # Generate's live preview: every 5 steps unless the session chose otherwise


@dataclass
class AppState:
    cfg: StudioConfig
    manager: ModelManager
    generator: Generator
    trainer: TrainingWorker  # one training run at a time, in its own thread (not the "gpu" lane of generation)
    # one GPU lane: the Stop button stops whatever generation runs now
    cancel: threading.Event = field(default_factory=threading.Event)
    expander: PromptExpander | None = None  # the GPT-2 prompt expander, loaded on first use
    # Stop per browser session: one user's Stop never ends another's generation
    _cancels: dict = field(default_factory=dict, repr=False)
    _cancels_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # live previews per browser session: how often (steps; 0 = off) and the latest picture, until shown
    _preview_every: dict = field(default_factory=dict, repr=False)
    _previews: dict = field(default_factory=dict, repr=False)

    def cancel_for(self, request) -> threading.Event:
        """The Stop event of the session making `request` (a gr.Request; None: the shared one)."""
        key = getattr(request, "session_hash", None)
        if not key:
            return self.cancel
        with self._cancels_lock:
            return self._cancels.setdefault(key, threading.Event())

    def preview_every(self, request) -> int:
        """The session's live-preview setting: a preview every N steps (0 = off); DEFAULT_PREVIEW_EVERY until set."""
        return self._preview_every.get(getattr(request, "session_hash", None), DEFAULT_PREVIEW_EVERY)

    def set_preview_every(self, request, every) -> None:
        self._preview_every[getattr(request, "session_hash", None)] = max(0, int(every or 0))

    def put_preview(self, request, image) -> None:
        """Keep the session's newest preview picture (an older one not yet shown is replaced)."""
        self._previews[getattr(request, "session_hash", None)] = image

    def take_preview(self, request):
        """The session's newest preview not yet shown, or None."""
        return self._previews.pop(getattr(request, "session_hash", None), None)

    def get_expander(self) -> PromptExpander:
        if self.expander is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.expander = PromptExpander(device=device, cache_dir=self.cfg.cache_dir / "expander")
        return self.expander

    @classmethod
    def create(cls, cfg: StudioConfig) -> AppState:
        cfg.ensure_dirs()
        manager = ModelManager(cfg)
        return cls(cfg, manager, Generator(manager), TrainingWorker(cfg))

    def shown(self, path) -> str:
        """`path` as the browser may see it: relative to the studio's home folder (outputs/2026-12-02/...), never
        the absolute install path; a file elsewhere by its name only."""
        path = Path(path)
        home = Path(self.cfg.outputs_dir).resolve().parent
        try:
            return path.resolve().relative_to(home).as_posix()
        except ValueError:
            return path.name

    @property
    def offline(self) -> bool:
        """No hub: HF_HUB_OFFLINE, or the hub does not answer within seconds (studio.models.hub)."""
        from studio.models import hub

        return hub.offline()
