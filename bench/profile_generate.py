"""Where eager sampling spends its time, studio vs plain diffusers (issue 25 target 1), and which levers help:
a torch.profiler count of kernels, syncs and host ops per image; the UNet alone eager, channels-last, fused QKV
and replayed as a CUDA graph (studio.models.cuda_graphs); and how long a second process takes to its first
compiled image with the inductor cache kept in a studio folder (target 3).
Usage: python bench/profile_generate.py [--only profile,levers,cache] [--work DIR]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SDXL_CONFIGS,
    build_sd15_folder,
    environment,
    median,
    sync,
    timed,
    write_report,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting, highly detailed"
NEGATIVE = "blurry, lowres"
STEPS, CFG, SIZE, SEED = 25, 7.0, 512, 1234


def studio_generator(folder: Path, graphs: bool, compile_mode: str = "off"):
    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.models.manager import ModelManager

    cfg = StudioConfig.from_env(device="cuda", precision="fp16", compile=compile_mode)
    from dataclasses import replace

    manager = ModelManager(replace(cfg, cuda_graphs=graphs))
    manager.load(str(folder))
    return Generator(manager)


def job(batch: int = 1):
    from studio.generation.job import GenerateJob

    return GenerateJob(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="DPM++ 2M", schedule="Karras", steps=STEPS,
                       cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=batch)


def plain_pipe(folder: Path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, safety_checker=None,
                                                requires_safety_checker=False).to("cuda")
    p.set_progress_bar_config(disable=True)
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
    return p


def summarize(prof) -> dict:
    """Kernel launches, host syncs, copies and the host ops that took the most CPU time in one profiled call."""
    rows = {}
    for e in prof.key_averages():
        rows[e.key] = {"count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                       "device_ms": getattr(e, "self_device_time_total", 0) / 1e3}
    def count(*names):
        return sum(rows[n]["count"] for n in rows if any(n.startswith(x) for x in names))
    kernels_ms = sum(r["device_ms"] for k, r in rows.items() if not k.startswith(("aten::", "cuda", "cu")))
    top = sorted(rows.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:25]
    return {"launches": count("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"),
            "graph_launches": count("cudaGraphLaunch"),
            "syncs": count("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
            "memcpy": count("cudaMemcpyAsync", "cudaMemcpy"), "device_busy_ms_approx": kernels_ms,
            "top_cpu": [(k, r["count"], round(r["self_cpu_ms"], 2)) for k, r in top], "rows": rows}


def profile(folder: Path, results: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    plain = plain_pipe(folder)
    eager = studio_generator(folder, graphs=False)
    graphed = studio_generator(folder, graphs=True)
    runs = {"plain": lambda: plain(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                                    width=SIZE, height=SIZE, generator=torch.Generator("cuda").manual_seed(SEED)),
            "studio_eager": lambda: eager.run(job()), "studio_graphs": lambda: graphed.run(job())}
    out = {}
    for name, fn in runs.items():
        fn(), fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        s = summarize(prof)
        s["wall_s_unprofiled"] = wall
        out[name] = s
        print(f"{name}: {wall:.3f} s, launches {s['launches']} (graph {s['graph_launches']}), syncs {s['syncs']}, "
              f"memcpy {s['memcpy']}, device busy ~{s['device_busy_ms_approx']:.0f} ms")
        for k, c, ms in s["top_cpu"][:12]:
            print(f"    {ms:9.2f} ms  {c:6d}  {k[:90]}")
    # host ops whose call counts differ between plain and the studio (what the studio does that plain does not)
    a, b = out["plain"]["rows"], out["studio_eager"]["rows"]
    diff = sorted(((k, b.get(k, {}).get("count", 0) - a.get(k, {}).get("count", 0),
                    b.get(k, {}).get("self_cpu_ms", 0) - a.get(k, {}).get("self_cpu_ms", 0)) for k in set(a) | set(b)),
                  key=lambda r: -abs(r[2]))[:30]
    print("studio_eager minus plain (count, self CPU ms):")
    for k, dc, dms in diff:
        print(f"    {dms:+9.2f} ms {dc:+6d}  {k[:90]}")
    for s in out.values():
        s.pop("rows")
    out["diff_studio_minus_plain"] = diff
    # stage times of the studio's eager call
    model = eager.manager.current
    j = job()
    stages = {}
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        cond, uncond, nets = eager.encode(j, model)
        sync()
        t1 = time.perf_counter()
        from studio.generation.denoise import denoise

        res = denoise(model.pipe, [nets.item(cond, uncond, CFG, SEED)], "DPM++ 2M", "Karras", STEPS, SIZE, SIZE,
                      decode=False)
        sync()
        t2 = time.perf_counter()
        from studio.generation.denoise import decode_latents

        decode_latents(model.pipe, res.latents)
        sync()
        t3 = time.perf_counter()
        stages = {"encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2}
    out["studio_eager_stages"] = stages
    print("studio eager stages:", {k: round(v, 4) for k, v in stages.items()})
    results["profile"] = out
    runs.clear()
    torch.cuda.empty_cache()


def unet_timing(call, n: int = 30) -> float:
    """Median seconds of `n` calls after three warm-up calls."""
    return median(timed(call, n, warmup=3))


@torch.no_grad()
def lever_case(unet, batch: int, latent: int, kind: str | None) -> dict:
    """ms per UNet call and the largest difference from eager, for each lever on one UNet."""
    from studio.models import cuda_graphs

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, device="cuda", dtype=torch.float16, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16, generator=g)
    t = torch.tensor(500, device="cuda")
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(batch, 1280, device="cuda", dtype=torch.float16, generator=g),
                 "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device="cuda",
                                          dtype=torch.float16)}

    def eager():
        return unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]

    def graphed(label: str) -> None:
        before = torch.cuda.memory_reserved()
        replay = cuda_graphs.recorder(unet)
        replay(x, t, text, added)
        row[f"{label}_max_abs_diff_vs_eager"] = float((replay(x, t, text, added) - ref).abs().max())
        row[f"{label}_pool_gib"] = (torch.cuda.memory_reserved() - before) / 2**30
        row[f"{label}_ms"] = unet_timing(lambda: replay(x, t, text, added)) * 1e3
        cuda_graphs.release(unet)

    row = {}
    ref = eager().clone()
    cuda_graphs.enable(unet, True)
    row["eager_ms"] = unet_timing(eager) * 1e3
    graphed("graph")
    unet.to(memory_format=torch.channels_last)
    row["channels_last_ms"] = unet_timing(eager) * 1e3
    graphed("channels_last_graph")
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    row["fused_qkv_ms"] = unet_timing(eager) * 1e3
    graphed("fused_qkv_graph")
    return row


def levers(folder: Path, results: dict) -> None:
    """The UNet alone at the CFG batch: eager, channels-last, fused QKV, and each replayed as a CUDA graph."""
    from diffusers import UNet2DConditionModel

    out = {}
    cases = [("sd15_bs1", folder / "unet", 2, 64, None), ("sd15_bs4", folder / "unet", 8, 64, None),
             ("sdxl_bs1", SDXL_CONFIGS / "unet", 2, 128, "sdxl")]
    for name, where, batch, latent, kind in cases:
        if kind == "sdxl":
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(where)).to("cuda", torch.float16)
        else:
            unet = UNet2DConditionModel.from_pretrained(where, dtype=torch.float16).to("cuda")
        out[name] = lever_case(unet.eval(), batch, latent, kind)
        print(name, {k: round(v, 4) for k, v in out[name].items()})
        del unet
        torch.cuda.empty_cache()
    results["levers"] = out


def compile_child(folder: Path, cache: Path, artifacts_in: str, artifacts_out: str) -> None:
    """One new process: load with Compile UNet (reduce-overhead), time the first image (the compile) and a second."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    if artifacts_in:
        torch.compiler.load_cache_artifacts(Path(artifacts_in).read_bytes())
    t0 = time.perf_counter()
    gen = studio_generator(folder, graphs=False, compile_mode="reduce-overhead")
    t1 = time.perf_counter()
    gen.run(job())
    sync()
    t2 = time.perf_counter()
    gen.run(job())
    sync()
    t3 = time.perf_counter()
    out = {"load_s": t1 - t0, "first_image_s": t2 - t1, "second_image_s": t3 - t2}
    if artifacts_out:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(artifacts_out).write_bytes(saved[0])
            out["artifact_bytes"] = len(saved[0])
    try:
        from torch._dynamo.utils import compile_times

        out["dynamo_compile_times"] = compile_times(repr="str")[:2000]
    except Exception:  # noqa: BLE001 - a diagnostic only
        pass
    print("CHILD " + json.dumps(out))


def cache(folder: Path, work: Path, results: dict) -> None:
    """Cold compile, then a new process with the same inductor cache folder, then one with a fresh folder and the
    first process's mega-cache artifacts loaded."""
    out = {}
    art = work / "artifacts.bin"
    for name, cache_dir, a_in, a_out in (("cold", work / "cacheA", "", str(art)), ("warm_same_folder", work / "cacheA", "", ""),
                                        ("fresh_folder_with_artifacts", work / "cacheB", str(art), "")):
        cmd = [sys.executable, __file__, "--child", str(folder), str(cache_dir), a_in or "-", a_out or "-"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
        got = json.loads(line[6:]) if line else {"error": proc.stderr[-3000:]}
        got["process_s"] = time.perf_counter() - t
        out[name] = got
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in got.items()
                     if k != "dynamo_compile_times"})
        if name == "cold" and "error" in got:
            break
    results["compile_cache"] = out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, cache_dir, a_in, a_out = sys.argv[2:6]
        compile_child(Path(folder), Path(cache_dir), "" if a_in == "-" else a_in, "" if a_out == "-" else a_out)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="profile,levers,cache")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="studio-profile-"))
    os.environ["STUDIO_HOME"] = str(work / "home")
    folder = build_sd15_folder(work / "sd15-random")
    results = {"env": environment()}
    for part in args.only.split(","):
        try:
            {"profile": lambda: profile(folder, results), "levers": lambda: levers(folder, results),
             "cache": lambda: cache(folder, work, results)}[part]()
        except Exception:  # noqa: BLE001 - one part failing must not lose the others' figures
            results[f"{part}_error"] = traceback.format_exc()
            print(f"{part} failed:\n{traceback.format_exc()}")
        write_report("profile_generate", results)


if __name__ == "__main__":
    main()
