"""`micro`: a tiny SD 1.x-family text-to-image model pretrained on a procedural world of captioned shapes.

world.py draws the scenes and their captions, oracle.py reads the attributes back from any image,
pretrain.py trains the model (on the lent GPU) and writes the diffusers folder in assets/micro/, and a canny
ControlNet for it in assets/micro-controlnet-canny/ (the built-in ControlNet `micro-canny`, for storyboards).
May import studio.models only (its tokenizer); its names and folders are in studio.models.builtin.
"""
