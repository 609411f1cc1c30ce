"""Start the studio: parse flags, load a model, build the UI, serve it (http://127.0.0.1:7860)."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Studio: personalize Stable Diffusion locally (Gradio UI).")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces (0.0.0.0) so other devices on your network can open "
                        "the studio; default is this machine only (127.0.0.1)")
    p.add_argument("--model", default=None,
                   help="model to open with: a name in models/, a .safetensors/.ckpt path, a diffusers folder, "
                        "a Hugging Face repo id, or demo-tiny (default: the first in models/, else demo-tiny)")
    p.add_argument("--device", default=None, help="auto (default), cuda, mps or cpu")
    p.add_argument("--precision", default=None, help="auto (default: fp16 on GPU, fp32 on CPU), fp16, bf16, fp32")
    p.add_argument("--home", default=None, help="folder holding models/, loras/, embeddings/, outputs/ "
                                                "(default: the studio folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    from studio.config import StudioConfig
    from studio.models import ModelLoadError
    from studio.ui import build_ui, startup_model
    from studio.ui.state import AppState
    from studio.ui.survey_page import NAV_CSS

    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    if args.home:
        cfg = cfg.with_home(Path(args.home))
    state = AppState.create(cfg)
    spec = startup_model(state, args.model)
    try:
        state.manager.load(spec)
    except (ValueError, ModelLoadError) as e:
        print(f"error: could not load {spec}: {e}\nstarting on demo-tiny instead", file=sys.stderr)
        state.manager.load("demo-tiny")
    demo = build_ui(state)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        allowed_paths=[str(cfg.outputs_dir), str(cfg.runs_dir)],  # runs/: training previews
        show_error=True,
        css=NAV_CSS,  # no navbar: the survey page is reached by its link only
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
