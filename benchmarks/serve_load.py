"""Load test of ``cavmae serve`` on 127.0.0.1: N concurrent clients, M classify requests each.

First, with no server running, what one request costs is measured in this process through the
server's own code (:class:`cavmae.runtime.serve.service.Service`): decoding the clip, and the
model per clip at batch 1 and at the largest ``--max-batch``. Those say what can limit the
server: decoding (``workers`` threads) or the model (one thread), and whether a larger batch is
cheaper per clip at all.

Then for each ``--max-batch`` value a fresh ``cavmae serve`` process is started on a free local
port; one warm-up round (every client sends one request at once) lets the engine and the
allocator reach their working size, then the server's resident memory (RSS) is read, the
measured run is made, and RSS is read again. Reported: status counts, p50/p99 latency,
throughput (requests/s), and from /metrics over the measured run: batches, mean batch size and
how busy the model thread was (its seconds / wall seconds).

    python benchmarks/serve_load.py --tiny                            # tiny model, the sample clip
    python benchmarks/serve_load.py --tiny --synthetic 1 --workers 4  # 1 s, 64x48 clip: decoding is cheap
    python benchmarks/serve_load.py -m exports/as-full --clients 8 --requests 10 --max-batch 8,1
    python benchmarks/serve_load.py --full-size --clients 8 --requests 10 --max-batch 8,1 \
        --time-limit 2400 --json benchmarks/results/serve-load-full-cpu.json

``--full-size`` serves a full-size (ViT-B, 527 classes) random-weight export: the checkpoint
``cavmae bench`` makes (``runtime/benchmark.py``, seed 0, written once into ``--work``),
exported once through ``cavmae.runtime.load`` into the cache and reused by later runs; its
path is printed, so later runs can pass it as ``-m EXPORT``. ``--tiny`` does the same with the
tiny size, in a temporary cache.

Bounded: every request has a timeout, each measured run ``--deadline`` seconds, and everything
after the export ``--time-limit`` seconds (a server start, warm-up or run that would pass it is
cut short or skipped, and the results say so); nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from cavmae.fsio import write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = REPO / "examples" / "media" / "00W1lcxW-WU_40.000.mp4"
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile by linear interpolation (numpy's default), without numpy."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Server:
    """``cavmae serve`` in a subprocess on a free port, stopped with Ctrl+C (SIGINT)."""

    def __init__(self, model: str, max_batch: int, extra: list[str], log: Path, ready_timeout: float = 600) -> None:
        exe = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))
        self.log = open(log, "w+")
        env = {**os.environ, "CAVMAE_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen([exe, "serve", "-m", model, "--port", "0", "--max-batch", str(max_batch),
                                      "--log-level", "warning", *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_timeout
        self.url = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.log.seek(0)
            found = LISTENING.search(self.log.read())
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        self.log.seek(0)
        raise RuntimeError(f"cavmae serve did not become ready:\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name[{labels}] value`` of Prometheus text (``name`` with
    its labels, as written); NaN when absent."""
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def model_counters(url: str) -> dict[str, float]:
    """Batches, clips and model-thread seconds of classify so far, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {"batches": metric(text, "cavmae_batch_size_count"), "clips": metric(text, "cavmae_batch_size_sum"),
            "model_s": metric(text, 'cavmae_batch_duration_seconds_sum{task="classify"}')}


def synthetic_clip(path: Path, duration: float) -> Path:
    """A small clip (64x48 pixels, 10 fps, 16 kHz mono AAC) made with the tests' media factory:
    it decodes in a few milliseconds, so the model, not decoding, is what a request costs."""
    sys.path.insert(0, str(REPO / "tests"))
    from media_factory import make_media

    return make_media(path, duration=duration)


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


def stage_costs(model: str, clip: Path, batches: list[int], repeat: int = 5) -> dict[str, Any]:
    """What one request costs, in this process and through the server's own code: decoding
    ``clip`` (probe, decode, fbank, frames) and the model per clip at each batch size (median of
    ``repeat`` runs after a warm-up round, the sizes taking turns), in ms."""
    from cavmae.runtime.benchmark import measure as timed
    from cavmae.runtime.serve.service import ClassifyRequest, Service

    service = Service.open(model)
    try:
        req = ClassifyRequest(mode="auto")
        decoded = service.decode_classify(clip, req, 600.0, 1)
        decode = timed(lambda: service.decode_classify(clip, req, 600.0, 1), warmup=0, repeat=repeat)
        # the batch sizes take turns, so that a change of the machine's other load hits all alike
        sizes = sorted(set(batches))
        runs: dict[int, list[float]] = {b: [] for b in sizes}
        for i in range(repeat + 1):
            for b in sizes:
                t = timed(lambda b=b: service.run_batch(("classify", decoded.mode), [decoded] * b), 0, 1)
                if i:  # the first round warms up
                    runs[b] += t
        model_ms = {str(b): 1e3 * median(runs[b]) / b for b in sizes}
        return {"decode_ms": 1e3 * median(decode), "model_ms_per_clip": model_ms, "engine": service.pipe.describe()}
    finally:
        service.close()


def load(url: str, clip: Path, clients: int, requests: int, timeout: float, deadline: float) -> dict[str, Any]:
    """``clients`` threads each sending ``requests`` classify uploads one after the other; none
    is sent after ``deadline`` seconds, and none waits past it by more than a second."""
    data = clip.read_bytes()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline

    def client(_: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as c:
            for _ in range(requests):
                left = stop_at - time.monotonic()
                if left <= 0:
                    key = "not sent (deadline)"
                    with lock:
                        statuses[key] = statuses.get(key, 0) + 1
                    continue
                t0 = time.monotonic()
                try:
                    code = str(c.post("/v1/classify", files={"file": (clip.name, data, "video/mp4")},
                                      timeout=min(timeout, left + 1.0)).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    latencies.append(time.monotonic() - t0)
                    statuses[code] = statuses.get(code, 0) + 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - t0
    ok = statuses.get("200", 0)
    return {"statuses": statuses, "wall_s": wall, "throughput_rps": ok / wall if wall else 0.0,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99), "n": len(latencies)}


def measure(model: str, max_batch: int, *, clip: Path = DEFAULT_CLIP, clients: int = 8, requests: int = 10,
            timeout: float = 600, deadline: float = 1800, extra: list[str] | None = None,
            workdir: Path | None = None, stop_at: float | None = None) -> dict[str, Any]:
    """One server, one warm-up round, one measured run; the figures as a dict. ``stop_at`` (a
    ``time.monotonic()`` value) bounds all of it: the server's start, the warm-up and the run."""
    work = Path(workdir or tempfile.mkdtemp(prefix="serve-load-"))

    def left(limit: float) -> float:
        return limit if stop_at is None else max(min(limit, stop_at - time.monotonic()), 0.0)

    server = Server(model, max_batch, extra or [], work / f"serve-b{max_batch}.log", ready_timeout=left(600))
    try:
        warm = load(server.url, clip, clients, 1, timeout, left(deadline))
        before = rss_mb(server.proc.pid)
        start = model_counters(server.url)
        run = load(server.url, clip, clients, requests, timeout, left(deadline))
        end = model_counters(server.url)
        after = rss_mb(server.proc.pid)
    finally:
        server.stop()
    batches, clips = end["batches"] - start["batches"], end["clips"] - start["clips"]
    model_s = end["model_s"] - start["model_s"]
    return {"max_batch": max_batch, "clients": clients, "requests_per_client": requests, "extra": extra or [],
            **run, "warmup_statuses": warm["statuses"], "rss_before_mb": before, "rss_after_mb": after,
            "rss_change": (after - before) / before, "batches": batches,
            "mean_batch": clips / batches if batches else float("nan"),
            "model_busy": model_s / run["wall_s"] if run["wall_s"] else float("nan"),
            "model_ms_per_clip": 1e3 * model_s / clips if clips else float("nan")}


#: where the random checkpoint is written by default: the work folder of ``cavmae bench``
#: (runtime/benchmark.py), so both use the same file
DEFAULT_WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-bench"


def random_export(size: str, work: Path, max_batch: int = 8) -> Path:
    """The ONNX export of a random-weight AudioSet classifier (527 classes) of ``size``:
    ``full`` (ViT-B, ``cavmae.BASE``) or ``tiny`` (``cavmae.TINY``, dim 64).

    The checkpoint is the one ``runtime/benchmark.py`` benchmarks (``_random_checkpoint``: seed
    0, written once into ``work``); it is exported through ``cavmae.runtime.load``, which keeps
    the export in the cache (``$CAVMAE_HOME``), keyed by the checkpoint's sha256, so a later call
    reuses it. Every graph is opened once, so a cache export that writes its graphs when they
    are first run is complete before a server opens it as a directory. Returns the export
    directory.
    """
    from cavmae import BASE, TINY
    from cavmae.runtime import load
    from cavmae.runtime.benchmark import _random_checkpoint

    config = BASE if size == "full" else TINY.replace(num_classes=527)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = _random_checkpoint(work, config)
    pipe = load(checkpoint, engine="ort", device="cpu", max_batch=max_batch, progress=True)
    try:
        for graph in pipe.manifest.graphs:
            pipe.engine.session(graph)
        return pipe.engine.export_dir
    finally:
        pipe.close()


def machine() -> dict[str, Any]:
    """The benchmark's machine description, with the load average (other work on the machine)."""
    from cavmae.runtime.benchmark import machine_info

    return {**machine_info(), "load_average_1m": os.getloadavg()[0]}


def _shown(path: Path) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


#: a measured run is not started with fewer seconds than this left of ``--time-limit``
MIN_RUN_S = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="Model for cavmae serve (export dir, checkpoint or registry name).")
    src.add_argument("--tiny", action="store_true", help="Build and serve a tiny random-weight classifier.")
    src.add_argument("--full-size", action="store_true",
                     help="Serve a full-size random-weight export, made (once, into the cache) if need be.")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help="Where --full-size keeps its random checkpoint [that of cavmae bench: %(default)s].")
    clips = ap.add_mutually_exclusive_group()
    clips.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="The clip every request uploads.")
    clips.add_argument("--synthetic", type=float, default=None, metavar="SECONDS",
                       help="Upload a small synthetic clip of this many seconds instead (cheap to decode).")
    ap.add_argument("--workers", type=int, default=None, help="Decoding threads of the server [its default].")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=10, help="Requests per client.")
    ap.add_argument("--max-batch", default="8,1",
                    help="Comma-separated --max-batch values, one server each (8,1,8,1 alternates them).")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds per request.")
    ap.add_argument("--deadline", type=float, default=1800, help="Seconds per measured run.")
    ap.add_argument("--time-limit", type=float, default=3600,
                    help="Seconds for everything after the export (one-request costs, servers, runs).")
    ap.add_argument("--stage-repeat", type=int, default=5, help="Rounds of the one-request measurement.")
    ap.add_argument("--json", type=Path, default=None, help="Write the results here.")
    return ap.parse_args(argv)


def _model(args: argparse.Namespace, tmp: Path, max_batch: int) -> tuple[str, str]:
    """The model to serve and how the results name it; ``--tiny`` and ``--full-size`` make it."""
    if args.model:
        return args.model, args.model
    if args.tiny:  # a throw-away cache: the tiny export is not worth keeping
        os.environ["CAVMAE_HOME"] = str(tmp / "cache")
        export = random_export("tiny", tmp / "tiny", max_batch)
    else:
        export = random_export("full", args.work, max_batch)
        print(f"full-size random-weight export: {export} (later runs can pass it as -m)", flush=True)
    return str(export), ("tiny" if args.tiny else "full-size") + " random weights (seed 0)"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """The one-request costs, then one server and run per ``--max-batch`` value, within the
    time limit; the results as a dict."""
    sizes = [int(x) for x in args.max_batch.split(",")]
    extra = ["--workers", str(args.workers)] if args.workers else []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model, label = _model(args, Path(tmp), max(sizes))
        began = time.monotonic()
        stop_at = began + args.time_limit
        clip = synthetic_clip(Path(tmp) / "synthetic.mp4", args.synthetic) if args.synthetic else args.clip
        results: dict[str, Any] = {
            "machine_before": machine(), "model": label, "export": _shown(Path(model)) if not args.model else None,
            "clip": f"synthetic {args.synthetic:g} s, 64x48, 10 fps" if args.synthetic else _shown(args.clip),
            "time_limit_s": args.time_limit, "runs": [],
        }
        costs = stage_costs(model, clip, [1, max(sizes)], repeat=args.stage_repeat)
        results["stage_costs"] = {**costs, "clip": results["clip"]}
        per_clip = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in costs["model_ms_per_clip"].items())
        print(f"one request: decode {costs['decode_ms']:.1f} ms; model per clip {per_clip}", flush=True)
        for b in sizes:
            if stop_at - time.monotonic() < MIN_RUN_S:
                r: dict[str, Any] = {"max_batch": b, "skipped": f"--time-limit {args.time_limit:g} s reached"}
            else:
                try:
                    r = measure(model, b, clip=clip, clients=args.clients, requests=args.requests,
                                timeout=args.timeout, deadline=args.deadline, extra=extra, workdir=Path(tmp),
                                stop_at=stop_at)
                except RuntimeError as e:  # the server did not start (in time): keep the other runs
                    r = {"max_batch": b, "skipped": str(e).splitlines()[0]}
            results["runs"].append(r)
            print(_run_line(r), flush=True)
        results["machine_after"] = machine()
        results["seconds_after_export"] = time.monotonic() - began
    return results


def _run_line(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"max-batch {r['max_batch']}: not measured: {r['skipped']}"
    return (f"max-batch {r['max_batch']}: {r['statuses']} in {r['wall_s']:.1f} s -> {r['throughput_rps']:.2f} req/s,"
            f" p50 {r['p50_s'] * 1e3:.0f} ms, p99 {r['p99_s'] * 1e3:.0f} ms, mean batch {r['mean_batch']:.2f},"
            f" model busy {r['model_busy']:.0%} ({r['model_ms_per_clip']:.0f} ms per clip),"
            f" RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB ({r['rss_change']:+.1%})")


def print_table(results: dict[str, Any]) -> None:
    """The runs as the Markdown table of benchmarks/README.md."""
    print("| max batch | responses | wall s | req/s | p50 ms | p99 ms | mean batch | model busy | model ms/clip"
          " | RSS before -> after MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results["runs"]:
        if "skipped" in r:
            print(f"| {r['max_batch']} | not measured: {r['skipped']} | | | | | | | | |")
            continue
        print(f"| {r['max_batch']} | {r['statuses']} | {r['wall_s']:.1f} | {r['throughput_rps']:.2f} |"
              f" {r['p50_s'] * 1e3:.0f} | {r['p99_s'] * 1e3:.0f} | {r['mean_batch']:.2f} | {r['model_busy']:.0%} |"
              f" {r['model_ms_per_clip']:.0f} |"
              f" {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} ({r['rss_change']:+.1%}) |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run_all(args)
    if args.json:
        write_json(args.json, results)
    print_table(results)


if __name__ == "__main__":
    main()
