"""Evaluation: CLIP-I / CLIP-T / DINO / FID / KID metrics (metrics.py, pure), the networks that embed images
(encoders.py), folder evaluation (folders.py), the experiment runner (experiment.py, tables and plot in
report.py) and the A/B survey (survey.py). May import every engine package below it, train included."""
