"""Progress on the command line: a one-line bar with ETA on stderr, and Ctrl+C as a Stop."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager


def progress_printer(label: str):
    """A one-line progress bar with ETA on stderr (tqdm), closed when the work ends."""
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int, info: str = "") -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit="step", file=sys.stderr, leave=False)
        bar["bar"].total = total
        bar["bar"].n = done
        bar["bar"].set_postfix_str(info, refresh=False)
        bar["bar"].refresh()

    def close() -> None:
        if bar["bar"] is not None:
            bar["bar"].close()

    update.close = close
    return update


@contextmanager
def cli_progress(label: str):
    """(on_progress, cancel) for one long command: a progress bar with ETA on stderr; Ctrl+C also sets `cancel`, so
    work running on other threads stops at its next step."""
    progress = progress_printer(label)
    cancel = threading.Event()
    try:
        yield progress, cancel
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        progress.close()
