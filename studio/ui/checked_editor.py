"""A Gradio image editor for painting masks whose uploads are checked like every other image here: the painted
layers' headers (size on disk, format, pixel count) are read before they are decoded, and the background and
composite the browser sends are never decoded (the picture painted on is always one the studio accepted through a
checked file). Gradio writes this module's .pyi stub, as it does for every component subclass."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from studio.files.images import SkipImage, Source, open_checked
from studio.generation.job import MAX_INIT_BYTES, MAX_INIT_PIXELS

MAX_LAYERS = 4  # the editor paints one layer; a crafted request with more is refused before decoding them


class _Bytes(Source):
    """A Source over bytes already in memory (the editor's layers can arrive as blobs)."""

    def __init__(self, label: str, data: bytes):
        super().__init__(label, Path(label))
        self.data = data

    def read(self, limit: int) -> bytes:
        return self.data[:limit + 1]

    def size(self) -> int | None:
        return len(self.data)


class CheckedImageEditor(gr.ImageEditor):
    """gr.ImageEditor whose value is {"background": None, "layers": [checked RGBA images], "composite": None}.
    Give it sources=() so the browser offers no upload into it. A template of ImageEditor (as gr.Sketchpad is):
    the browser shows Gradio's own editor."""

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.id is not None:
            cached = self.blob_storage.pop(payload.id, None)
            layers = list(cached.layers) if cached is not None else []
        else:
            layers = list(payload.layers or [])
        layers = [layer for layer in layers if layer is not None]
        if len(layers) > MAX_LAYERS:
            raise gr.Error(f"the mask editor sent {len(layers)} layers; at most {MAX_LAYERS} are read")
        return {"background": None, "layers": [checked_layer(layer, i) for i, layer in enumerate(layers)],
                "composite": None}


def checked_layer(layer, index: int) -> Image.Image:
    """One painted layer, its header checked before it is decoded; a refused one is a gr.Error saying why."""
    label = f"mask layer {index + 1}"
    source = _Bytes(label, bytes(layer)) if isinstance(layer, (bytes, bytearray, memoryview)) \
        else Source(label, Path(layer.path))
    try:
        image = open_checked(source, MAX_INIT_PIXELS, MAX_INIT_BYTES)
    except SkipImage as e:
        raise gr.Error(f"{label}: {e}") from None
    return image.convert("RGBA")
