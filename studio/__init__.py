"""Studio: a local app for personalizing Stable Diffusion (engine package; the UI lives in studio.ui)."""

import logging

__version__ = "0.1.0"


def quiet_libraries() -> None:
    """Silence start-up noise the studio has no use for (app and command line): bitsandbytes warns about an optional
    CPU kernel package whenever peft imports it, and diffusers/transformers draw a bar per component loaded."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
