"""Text to image: the typed job, the Generator, the denoise loop, prompt syntax and encoding, samplers, A1111
infotext, presets. May import studio.config, files, models and control."""
