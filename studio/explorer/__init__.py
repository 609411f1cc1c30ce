"""The parameter explorer: A1111's X/Y/Z plot syntax, the grid runner (cells as batched passes) and the grid
image. May import studio.config, files, models and generation."""
