"""What the UI holds for the whole process: the config, the model owner, the generator, Stop events."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from studio.config import StudioConfig
from studio.generate import Generator
from studio.models import ModelManager


@dataclass
class AppState:
    cfg: StudioConfig
    manager: ModelManager
    generator: Generator
    # one GPU lane: the Stop button stops whatever generation runs now
    cancel: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(cls, cfg: StudioConfig) -> AppState:
        cfg.ensure_dirs()
        manager = ModelManager(cfg)
        return cls(cfg, manager, Generator(manager))

    @property
    def offline(self) -> bool:
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
