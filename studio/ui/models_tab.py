"""The Models tab: memory options, download of SD 1.5, and converting the loaded model between formats."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import torch

from studio.files.convert import ModelExistsError, save_diffusers_folder, save_single_file
from studio.files.names import check_name, safe_child
from studio.models.checkpoints import ModelLoadError
from studio.models.manager import DEFAULT_DOWNLOAD
from studio.models.speed import COMPILE_MODES
from studio.ui.state import AppState


def device_text(state: AppState) -> str:
    dev = state.manager.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type.upper()
    return f"**Device:** {name} · **precision:** {str(state.manager.dtype).replace('torch.', '')}"


REPLACE_MODEL_LABEL = "Replace the model of that name"


def build(state: AppState, model_dropdown: gr.Dropdown):
    gr.Markdown(device_text(state))
    with gr.Accordion("Memory and speed", open=True):
        gr.Markdown("Trade speed for memory on small cards. Offload applies on CUDA and reloads the model. "
                    "Costs measured on an H100 are in docs/benchmarks.md (Memory settings).")
        with gr.Row():
            slicing = gr.Checkbox(state.manager.memory["attention_slicing"], label="Attention slicing",
                                  info="with PyTorch 2 slower and no saving (1.9 GiB more at 1024²): keep off")
            tiling = gr.Checkbox(state.manager.memory["vae_tiling"], label="VAE tiling (large images)",
                                 info="1.8 GiB less at 1024², almost no cost")
            offload = gr.Checkbox(state.manager.memory["cpu_offload"], label="Model CPU offload",
                                  info="0.9 GiB less at 512², about 2x slower")
            compile_mode = gr.Dropdown(list(COMPILE_MODES), value=state.manager.memory["compile"],
                                       label="Compile UNet (CUDA; first image per size compiles)")
        apply_btn = gr.Button("Apply memory options")
        memory_status = gr.Markdown()

    def apply(s, t, o, c, progress=gr.Progress()):
        progress(0, desc="applying")
        try:
            return state.manager.set_memory_options(s, t, o, c)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from e

    apply_btn.click(apply, [slicing, tiling, offload, compile_mode], memory_status, concurrency_id="gpu",
                    api_visibility="private")

    with gr.Accordion("Download", open=not state.manager.has_real_model()):
        if state.offline:
            gr.Markdown(f"Offline: downloads are off. To add **{DEFAULT_DOWNLOAD}**, fetch it on a connected "
                        f"machine and copy the folder or its `.safetensors` file into `{state.cfg.models_dir}`.")
        else:
            repo = gr.Textbox(DEFAULT_DOWNLOAD, label="Hugging Face repo id")
            download_btn = gr.Button("Download into models/")
            download_status = gr.Markdown()

            def download(repo_id, progress=gr.Progress(track_tqdm=True)):
                try:
                    path = state.manager.download(repo_id.strip())
                except (ValueError, ModelLoadError) as e:
                    raise gr.Error(str(e)) from e
                return (f"downloaded to `{path}`; pick it in the Model menu",
                        gr.update(choices=state.manager.choices()))

            download_btn.click(download, repo, [download_status, model_dropdown], concurrency_id="gpu",
                               api_visibility="private")

    with gr.Accordion("Convert the loaded model", open=False):
        gr.Markdown("Save the loaded model as a diffusers folder or as one `.safetensors` file in the original "
                    "layout that A1111, ComfyUI and kohya read. The result goes into `models/`.")
        with gr.Row():
            fmt = gr.Radio(["single-file", "diffusers"], value="single-file", label="Format")
            precision = gr.Radio(["fp16", "fp32"], value="fp16", label="Single-file precision")
            out_name = gr.Textbox(label="Name in models/", placeholder="my-model", elem_id="cv-name")
            out_replace = gr.Checkbox(False, label=REPLACE_MODEL_LABEL, elem_id="cv-replace")
        convert_btn = gr.Button("Convert")
        convert_status = gr.Markdown()

    def convert(kind, prec, name, replace=False, progress=gr.Progress()):
        model = state.manager.current
        if model is None:
            raise gr.Error("no model is loaded")
        try:
            check_name(name, "model")  # refused as typed, never changed: a/b is not a-b
            if kind == "single-file" and not name.endswith(".safetensors"):
                name += ".safetensors"
            target = safe_child(state.cfg.models_dir, name)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        existed = target.exists()
        progress(0.1, desc="converting")
        try:
            if kind == "diffusers":
                save_diffusers_folder(model.without_loras(), target, overwrite=bool(replace))
            else:
                dtype = torch.float16 if prec == "fp16" else torch.float32
                save_single_file(model.without_loras(), target, model.family, dtype=dtype,
                                 metadata={"modelspec.title": model.name}, overwrite=bool(replace))
        except ModelExistsError as e:
            raise gr.Error(f"Nothing was converted: {e}. Type another name, or tick '{REPLACE_MODEL_LABEL}'.") from e
        except (ValueError, RuntimeError, OSError) as e:
            raise gr.Error(f"conversion failed: {e}") from e
        where = f"{Path(state.cfg.models_dir).name}/{target.name}"
        return (f"saved `{where}`" + (" (the earlier one was replaced)" if existed else ""),
                gr.update(choices=state.manager.choices()), False)

    convert_btn.click(convert, [fmt, precision, out_name, out_replace], [convert_status, model_dropdown, out_replace],
                      concurrency_id="gpu", api_visibility="private")
