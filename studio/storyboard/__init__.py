"""Storyboards: the board (shots, shot types, styles, project files), the runner that makes their frames, and
the PDF / contact-sheet export. May import every package below it, explorer included (grid lettering)."""
