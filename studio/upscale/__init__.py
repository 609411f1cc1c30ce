"""Upscalers: A1111's built-in pixel resizes (None, Lanczos, Nearest) and model files in upscalers/ (ESRGAN,
Real-ESRGAN, SwinIR, ... read with spandrel), run in tiles, plus the PNGs A1111's Extras writes. May import
studio.files and studio.config; generation (hires fix) and the tabs and commands import it."""
