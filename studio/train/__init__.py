"""Training: Textual Inversion (standard, attention module, Mixture-of-Experts module) on one shared loop,
run folders with checkpoints and previews, and a background worker the UI polls."""
