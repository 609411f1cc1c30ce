"""Start the studio: parse flags, load a model, build the UI, serve it (http://127.0.0.1:7860)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Studio: personalize Stable Diffusion locally (Gradio UI).")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces (0.0.0.0) so other devices on your network can open "
                        "the studio; default is this machine only (127.0.0.1). Same as --host 0.0.0.0")
    p.add_argument("--host", default=None, metavar="ADDRESS",
                   help="the address to serve on: 127.0.0.1 (default, this machine only), one interface's address "
                        "(e.g. 192.168.1.20 or a VPN address), or 0.0.0.0 for all; anything but loopback needs "
                        "--auth or --insecure-no-auth")
    p.add_argument("--model", default=None,
                   help="model to open with: a name in models/, a .safetensors/.ckpt path, a diffusers folder, "
                        "a Hugging Face repo id, micro or demo-tiny (default: the first in models/, else micro)")
    p.add_argument("--device", default=None, help="auto (default), cuda, mps or cpu")
    p.add_argument("--precision", default=None, help="auto (default: fp16 on GPU, fp32 on CPU), fp16, bf16, fp32")
    p.add_argument("--compile", default=None, choices=["off", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the UNet on CUDA (default off): the first image at each size compiles, "
                        "later ones run faster; reduce-overhead adds CUDA graphs")
    p.add_argument("--home", default=None, help="folder holding models/, loras/, embeddings/, outputs/ "
                                                "(default: the studio folder)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="ask for this user name and password before anything is shown (required with --listen "
                        "and --share); @FILE reads USER:PASSWORD from the file's first line, so the password does not "
                        "show in the process list")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow --listen or --share without --auth: anyone who can reach the port can use the "
                        "studio and read its outputs")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise (or lower) one of the limits on what a request may cost, e.g. --limit "
                        "max_prompt_chars=50000 (repeatable; names in docs/guide.md; also STUDIO_LIMIT_<NAME>)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (off unless asked; needs --auth)")
    return p.parse_args(argv)


def network_options(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(launch() keywords for address, login and share link; warnings to print). Pure: no server is started.

    This machine only (127.0.0.1) unless --host or --listen; no share link unless --share; serving beyond this
    machine needs --auth user:password, or --insecure-no-auth to say it is meant. Raises ValueError on a bad
    combination."""
    auth = None
    if args.auth is not None:
        value = args.auth
        if value.startswith("@"):
            try:
                value = Path(value[1:]).expanduser().read_text(encoding="utf-8").splitlines()[0].strip()
            except (OSError, IndexError, UnicodeDecodeError) as e:
                raise ValueError(f"--auth {args.auth}: cannot read USER:PASSWORD from that file ({e})") from None
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError("--auth must be USER:PASSWORD with a non-empty user name and password")
        if args.insecure_no_auth:
            raise ValueError("--auth and --insecure-no-auth contradict each other; give one of them")
        auth = (user.strip(), password)
    host = server_host(args)
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if not args.listen and not is_loopback(host):
        exposed.insert(0, f"--host {host}")
    warnings = []
    if exposed and auth is None:
        if not args.insecure_no_auth:
            raise ValueError(f"{' and '.join(exposed)} lets other machines open the studio: add --auth "
                             "user:password, or --insecure-no-auth if everyone who can reach it may use it")
        warnings.append(f"warning: {' and '.join(exposed)} without --auth: anyone who can reach this server can "
                        "generate, train and read your outputs")
    # explicit values, so GRADIO_SERVER_NAME / GRADIO_SHARE in the environment cannot widen them
    options = {"server_name": host, "share": bool(args.share), "auth": auth}
    return options, warnings


def server_host(args: argparse.Namespace) -> str:
    """The address to bind: --host, else 0.0.0.0 with --listen, else 127.0.0.1. Raises ValueError on a bad one."""
    host = getattr(args, "host", None)
    if host is None:
        return "0.0.0.0" if args.listen else "127.0.0.1"
    host = host.strip()
    if args.listen and host != "0.0.0.0":
        raise ValueError(f"--listen means --host 0.0.0.0; give one of them, not --listen with --host {host}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--host must be an IP address such as 127.0.0.1, 192.168.1.20 or 0.0.0.0, "
                             f"got {host!r}") from None
    return host


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def file_access(cfg) -> dict:
    """launch() keywords for the files the browser may fetch: outputs/, runs/ (training previews) and storyboards/
    (frames, references, exports) only, and not outputs/surveys/ (the key to a blind survey, and its answers).
    Everything else (models, LoRAs, datasets, the rest of the disk) answers 403 to /gradio_api/file=."""
    return {"allowed_paths": [str(cfg.outputs_dir), str(cfg.runs_dir), str(cfg.storyboards_dir)],
            "blocked_paths": [str(cfg.models_dir), str(cfg.cache_dir), str(cfg.outputs_dir / "surveys")]}


def create_app(args: argparse.Namespace, network: dict):
    """(the Blocks app, the keywords for its launch(), the AppState): everything `python app.py` serves."""
    from studio.config import StudioConfig, parse_limit_overrides
    from studio.models.checkpoints import ModelLoadError
    from studio.ui import build_ui, startup_model
    from studio.ui.state import AppState
    from studio.ui.survey_page import NAV_CSS

    cfg = StudioConfig.from_env(device=args.device, precision=args.precision, compile=args.compile,
                                limits=parse_limit_overrides(getattr(args, "limit", None)))
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
    from starlette.middleware import Middleware

    from studio.ui.access import LoginRequired

    launch = {
        "server_port": args.port,
        # with --auth, every route needs the login (Gradio leaves /cancel, /reset and others open)
        "app_kwargs": {"middleware": [Middleware(LoginRequired)]},
        **network,
        **file_access(cfg),
        "show_error": True,
        # the largest file the engine takes (a dataset image or a storyboard reference); larger zips by path
        "max_file_size": "200mb",
        "css": NAV_CSS,  # no navbar: the survey page is reached by its link only
    }
    return demo, launch, state


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from studio.config import parse_limit_overrides

        parse_limit_overrides(args.limit)
        network, warnings = network_options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in warnings:
        print(line, file=sys.stderr)
    from studio import quiet_libraries

    quiet_libraries()
    demo, launch, state = create_app(args, network)
    host = network["server_name"]
    shown = "127.0.0.1" if host == "0.0.0.0" else (f"[{host}]" if ":" in host else host)
    model = state.manager.current.name if state.manager.current else "no model"
    # Gradio's own start-up lines (and its share-link hint, which the studio's flags replace) stay quiet
    print(f"Studio running at http://{shown}:{args.port} (model: {model}{', all interfaces' if host == '0.0.0.0' else ''})",
          flush=True)
    demo.launch(**launch, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
