"""Files in the user folders and their formats: safe names, atomic writes, hashes, pickle checks, safe image
reading, LoRA and embedding files (kohya, A1111, diffusers), applying LoRAs, checkpoint conversion.
Bottom layer: imports nothing from the studio."""
