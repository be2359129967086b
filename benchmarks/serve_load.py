"""Load on `detrkit serve`: throughput and p50/p99 latency with batching on and off, run by hand.

    python benchmarks/serve_load.py --weights runs/demo/best --images data/synthetic/val
    python benchmarks/serve_load.py --weights detr-r50/ --image-size 800 1066 --requests 400
    python benchmarks/serve_load.py --weights runs/demo/best --requests 40 --repeats 1   # a smoke run

Each mode starts its own server process (``python -m detrkit serve --port 0``), exactly as a
user would, so the clients (threads of this process, one keep-alive connection each) do not
share the server's interpreter. "on" is ``--max-batch N --max-wait-ms W``, "off" is
``--max-batch 1``. Each mode is warmed up, then the modes alternate for ``--repeats`` rounds
(ABAB...); reported are the medians over rounds of throughput (answered requests per second of
wall time), p50 and p99 latency (send to last byte), the mean size of the model call each request
was in, and the ratio of throughputs on / off. Every answer must be 200; the script stops otherwise. The images are the files
given, or noise JPEGs of ``--image-size`` (H W) when none are.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="checkpoint folder or .onnx file")
    p.add_argument("--images", nargs="*", default=[], help="image files or folders (default: noise JPEGs)")
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="size of the noise images when no --images are given (default: 480 640)")
    p.add_argument("--requests", type=int, default=400, help="requests per mode and round (default: 400)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--max-batch", type=int, default=8, help="batching on: --max-batch of the server (default: 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching on: --max-wait-ms (default: 5)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of on and off (default: 3)")
    p.add_argument("--device", default="auto", help="the server's --device (default: auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the server's --precision")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    return p.parse_args(argv)


def load_images(args) -> list[bytes]:
    files = []
    for name in args.images:
        path = Path(name)
        files += sorted(f for f in path.rglob("*") if f.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
    if files:
        return [f.read_bytes() for f in files[:64]]
    h, w = args.image_size
    rng = np.random.default_rng(0)
    out = []
    for _ in range(8):
        small = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Server:
    """``python -m detrkit serve`` in a child process on a free port."""

    def __init__(self, args, max_batch: int) -> None:
        cmd = [sys.executable, "-m", "detrkit", "serve", "--weights", args.weights, "--port", "0",
               "--device", args.device, "--precision", args.precision, "--max-batch", str(max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--max-pending", str(max(64, 2 * args.clients))]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("detrkit serve: http://"):
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        self.url = line.split()[2].rstrip("/")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def run_round(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    """``requests`` POST /predict from ``clients`` threads, each on one keep-alive connection."""
    parts = urllib.parse.urlsplit(url)
    latencies, batches, lock = [], [], threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        for i in range(k, requests, clients):
            start = time.perf_counter()
            conn.request("POST", "/predict", body=images[i % len(images)],
                         headers={"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            body = response.read()
            took = time.perf_counter() - start
            if response.status != 200:
                raise SystemExit(f"request {i}: HTTP {response.status}: {body[:200]!r}")
            with lock:
                latencies.append(took)
                batches.append(json.loads(body)["batch"])
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    if len(latencies) != requests:
        raise SystemExit(f"{requests - len(latencies)} requests got no answer")
    ms = np.asarray(latencies) * 1000
    return {"throughput": requests / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_batch": float(np.mean(batches))}


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None) -> dict:
    args = parse_args(argv)
    images = load_images(args)
    modes = {"on": args.max_batch, "off": 1}
    servers = {mode: Server(args, batch) for mode, batch in modes.items()}
    try:
        for server in servers.values():  # warm-up: first calls allocate and pick kernels
            run_round(server.url, images, max(args.clients, 16), args.clients)
        rounds = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, server in servers.items():  # one server idles while the other is measured
                rounds[mode].append(run_round(server.url, images, args.requests, args.clients))
    finally:
        for server in servers.values():
            server.stop()
    result = {"machine": machine(), "weights": args.weights, "requests": args.requests, "clients": args.clients,
              "repeats": args.repeats, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "modes": {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                        for mode, runs in rounds.items()}}
    on, off = result["modes"]["on"], result["modes"]["off"]
    result["throughput_ratio_on_off"] = on["throughput"] / off["throughput"]
    print(f"{result['machine']}; {args.weights}; {args.requests} requests x {args.repeats} rounds from "
          f"{args.clients} clients; median over rounds")
    print("| batching | requests/s | p50 ms | p99 ms | mean batch per request |\n|---|---|---|---|---|")
    for mode, label in (("on", f"on (max {args.max_batch}, {args.max_wait_ms:g} ms)"), ("off", "off")):
        m = result["modes"][mode]
        print(f"| {label} | {m['throughput']:.1f} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {m['mean_batch']:.2f} |")
    print(f"throughput on / off: {result['throughput_ratio_on_off']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
