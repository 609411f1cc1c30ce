"""Studio: a local app for personalizing Stable Diffusion (engine package; the UI lives in studio.ui)."""

__version__ = "0.1.0"
