"""The measurements of ``benchmarks/gpu.sh``, one per process (``python gpu_bench.py STEP``).

Steps (each writes ``OUT/STEP[-variant].json``):

- ``prepare``: a full-size random-weight classifier checkpoint (latency does not depend on
  the weights), written once into the work directory;
- ``reference --precision fp32|fp16``: the reference evaluation loop on the GPU, eager
  (whole forward once per frame, 10 frames, sigmoid averaged); fp16 is CUDA autocast;
- ``engine --precision fp16|bf16``: the runtime's torch engine (``cavmae.runtime.load``,
  ``classify_batch``), eager, then with the transformer blocks under ``torch.compile``
  (default mode) and under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
- ``decode``: decode + preprocessing of each sample clip on the CPU (``load_clip``);
- ``train``: optimizer steps per second of the full-size pre-training model (CAVMAE), bf16
  autocast and fp16 autocast with a gradient scaler, AdamW;
- ``merge``: every step's JSON into one file.

``--dry-run`` runs every step on the CPU with the tiny config, batch 1 (train: 2), one timed
iteration and ``torch.compile(backend="eager")``, so a test keeps the script working in seconds.
Only torch, onnx/onnxruntime (CPU) and the repository are needed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CLIPS = sorted((REPO / "examples" / "media").glob("*.mp4"))


# -- shared ---------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes and repeats of a real run or a dry run."""
    from cavmae.config import BASE, TINY

    if args.dry_run:
        return {"device": "cpu", "config": TINY, "batches": (1,), "train_batch": 2, "warmup": 0,
                "repeat": 1, "train_steps": 1, "compile_backend": "eager", "frames": 2}
    return {"device": "cuda", "config": BASE, "batches": (1, 8), "train_batch": args.train_batch,
            "warmup": 3, "repeat": args.repeat, "train_steps": args.train_steps,
            "compile_backend": "inductor", "frames": 10}


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host": platform.node(), "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int, repeat: int) -> dict[str, float]:
    """Median / p90 / min seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {"p50_s": statistics.median(samples), "p90_s": float(np.percentile(samples, 90)),
            "min_s": min(samples), "n": len(samples)}


def inputs(cfg, batch: int, frames: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, generator=g)
    video = torch.randn(batch, frames, 3, cfg.image_size, cfg.image_size, generator=g)
    return audio.to(device), video.to(device)


def checkpoint_path(args: argparse.Namespace) -> Path:
    return args.work / ("tiny-classifier.pth" if args.dry_run else "random-classifier-base.pth")


def write(args: argparse.Namespace, name: str, data: dict[str, Any]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
    return path


# -- steps ----------------------------------------------------------------------------------
def step_prepare(args: argparse.Namespace, s: dict[str, Any]) -> None:
    from cavmae.checkpoint import save_checkpoint
    from cavmae.model import CAVMAEFT

    path = checkpoint_path(args)
    if not path.is_file():
        args.work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(CAVMAEFT(s["config"]).eval(), path)
    write(args, "prepare", {"checkpoint": str(path), "bytes": path.stat().st_size,
                            "machine": machine(s["device"])})


def step_reference(args: argparse.Namespace, s: dict[str, Any]) -> None:
    from cavmae.checkpoint import load_checkpoint

    device, amp = s["device"], {"fp32": None, "fp16": torch.float16}[args.precision]
    model = load_checkpoint(checkpoint_path(args)).to(device).eval()
    out: dict[str, Any] = {"step": "reference", "precision": args.precision, "machine": machine(device),
                           "what": "eager, whole forward once per frame, sigmoid averaged", "runs": {}}
    for b in s["batches"]:
        audio, video = inputs(model.config, b, s["frames"], device)

        def loop(audio=audio, video=video) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=amp or torch.float32,
                                                        enabled=amp is not None):
                probs = [torch.sigmoid(model(audio, video[:, i]).float()) for i in range(video.shape[1])]
                return torch.stack(probs).mean(0)

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        r = timed(loop, device, s["warmup"], s["repeat"])
        r["clips_per_s"] = b / r["p50_s"]
        if device.startswith("cuda"):
            r["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["runs"][f"batch{b}"] = r
        print(f"reference {args.precision} batch {b}: {r['p50_s'] * 1e3:.1f} ms", file=sys.stderr)
    write(args, f"reference-{args.precision}", out)


def compile_blocks(model: torch.nn.Module, **kw: Any) -> int:
    """Put every transformer block of ``model`` under ``torch.compile``; returns how many.

    The blocks (``blocks_a``, ``blocks_v``, ``blocks_u``, the decoder's) are where the time goes;
    compiling them leaves the stage code, the masking and the heads as they are.
    """
    n = 0
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList) and name.startswith(("blocks", "decoder_blocks")):
            for i in range(len(child)):
                if name == "blocks_u" and i == 0:
                    # The classifier runs the first joint block through forward_shared_prefix
                    # (its audio-only work once per clip); a compiled module would hand that
                    # method over uncompiled, so it is compiled by itself.
                    blk = child[i]
                    blk.forward_shared_prefix = torch.compile(blk.forward_shared_prefix, **kw)  # type: ignore[method-assign]
                child[i] = torch.compile(child[i], **kw)
                n += 1
    return n


def step_engine(args: argparse.Namespace, s: dict[str, Any]) -> None:
    from cavmae.runtime import load

    device = s["device"]
    precision = args.precision
    if not device.startswith("cuda") and precision == "fp16":
        precision = "bf16"  # dry run on the CPU: fp16 autocast is CUDA only
    variants = {"eager": None,
                "compile": {"backend": s["compile_backend"]},
                "compile-cudagraphs": {"backend": s["compile_backend"], "mode": "reduce-overhead"}}
    if s["compile_backend"] == "eager":
        variants["compile-cudagraphs"] = {"backend": "eager"}  # no CUDA graphs on the CPU
    out: dict[str, Any] = {"step": "engine", "precision": precision, "machine": machine(device),
                           "what": "cavmae.runtime torch engine, classify_batch (audio once, frames batched)",
                           "variants": {}}
    for variant, kw in variants.items():
        pipe = load(checkpoint_path(args), engine="torch", device=device, precision=precision,
                    num_frames=s["frames"], max_batch=max(s["batches"]))
        entry: dict[str, Any] = {}
        if kw is not None:
            entry["compiled_blocks"] = compile_blocks(pipe.engine.model, **kw)
        for b in s["batches"]:
            audio, video = inputs(pipe.manifest.model_config, b, s["frames"], "cpu")
            a, v = audio.numpy(), video.numpy()
            t0 = time.perf_counter()
            pipe.classify_batch(a, v)  # the first call compiles
            entry[f"first_call_batch{b}_s"] = time.perf_counter() - t0
            r = timed(lambda a=a, v=v, pipe=pipe: pipe.classify_batch(a, v), device, s["warmup"], s["repeat"])
            r["clips_per_s"] = b / r["p50_s"]
            entry[f"batch{b}"] = r
            print(f"engine {precision} {variant} batch {b}: {r['p50_s'] * 1e3:.1f} ms", file=sys.stderr)
        out["variants"][variant] = entry
        write(args, f"engine-{args.precision}", out)  # after each variant: a timeout keeps these
        pipe.close()
        torch._dynamo.reset()


def step_decode(args: argparse.Namespace, s: dict[str, Any]) -> None:
    from cavmae.media import load_clip

    out: dict[str, Any] = {"step": "decode", "machine": machine("cpu"), "torch_threads": torch.get_num_threads(),
                           "what": "load_clip: decode audio + 10 frames, fbank, frame preprocessing (CPU)",
                           "clips": {}}
    for clip in CLIPS:
        r = timed(lambda clip=clip: load_clip(clip), "cpu", 1, max(s["repeat"] // 2, 1))
        out["clips"][clip.name] = r
        print(f"decode {clip.name}: {r['p50_s'] * 1e3:.1f} ms", file=sys.stderr)
    write(args, "decode", out)


def step_train(args: argparse.Namespace, s: dict[str, Any]) -> None:
    from cavmae.model import CAVMAE

    device = s["device"]
    kind = device.split(":")[0]
    amps = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}
    if kind == "cpu":
        amps = {"bf16": (torch.bfloat16, False)}
    out: dict[str, Any] = {"step": "train", "machine": machine(device), "batch": s["train_batch"],
                           "what": "CAVMAE pre-training step: forward (masking 0.75, MAE + contrastive"
                                   " loss), backward, AdamW", "runs": {}}
    for name, (dtype, scaled) in amps.items():
        torch.manual_seed(0)
        model = CAVMAE(s["config"]).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=5e-7, betas=(0.95, 0.999),
                                fused=kind == "cuda")
        scaler = torch.amp.GradScaler(kind, enabled=scaled)
        audio, video = inputs(model.config, s["train_batch"], 1, device)
        image = video[:, 0]

        def train_step(model=model, opt=opt, scaler=scaler, dtype=dtype, audio=audio, image=image) -> None:
            with torch.autocast(kind, dtype=dtype):
                loss = model(audio, image).loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        if kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = timed(lambda train_step=train_step: [train_step() for _ in range(s["train_steps"])], device, 1, s["repeat"])
        r["steps"] = s["train_steps"]
        r["steps_per_s"] = s["train_steps"] / r["p50_s"]
        r["samples_per_s"] = r["steps_per_s"] * s["train_batch"]
        if kind == "cuda":
            r["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["runs"][name] = r
        print(f"train {name}: {r['samples_per_s']:.1f} samples/s", file=sys.stderr)
        del model, opt
    write(args, "train", out)


def step_merge(args: argparse.Namespace, s: dict[str, Any]) -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))}
    status = {}
    if args.status and args.status.is_file():
        status = dict(line.split(maxsplit=1) for line in args.status.read_text().splitlines() if line.strip())
    merged = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run,
              "steps": status, "results": parts}
    target = args.merged or args.out.with_suffix(".json")
    target.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(f"wrote {target}", file=sys.stderr)


STEPS = {"prepare": step_prepare, "reference": step_reference, "engine": step_engine,
         "decode": step_decode, "train": step_train, "merge": step_merge}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one measurement of benchmarks/gpu.sh")
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("--out", type=Path, required=True, help="directory of the step JSON files")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-gpu-bench")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=48)
    ap.add_argument("--train-steps", type=int, default=5, help="optimizer steps per timed sample")
    ap.add_argument("--status", type=Path, default=None, help="merge: file of 'step status' lines")
    ap.add_argument("--merged", type=Path, default=None, help="merge: where to write the merged JSON")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one iteration")
    args = ap.parse_args(argv)
    s = settings(args)
    if s["device"] == "cuda" and args.step not in ("decode", "merge") and not torch.cuda.is_available():
        print("Error: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run on a CPU",
              file=sys.stderr)
        return 2
    if s["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference's numbers
        torch.backends.cudnn.allow_tf32 = False
    STEPS[args.step](args, s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
