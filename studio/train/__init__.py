"""Training: Textual Inversion (standard, attention module, Mixture-of-Experts module), LoRA and UNet fine-tunes
on one shared loop, run folders with checkpoints and previews, and a background worker the UI polls.
May import studio.config, files, models, generation and dataset."""
