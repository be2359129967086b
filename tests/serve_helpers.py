"""Shared by the serve tests: a tiny checkpoint with spread-out scores, test images, a real
uvicorn server on a free localhost port (in a thread), and a plain HTTP client."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image

from detrkit import build_model, save_model, serve
from detrkit.presets import preset

TINY = preset("detr_r18_tiny", num_classes=3)
CLASSES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 12, "name": "star"}]
INFERENCE = {"image_size": 96, "max_size": None}
ORIENTATION = 0x0112  # the EXIF tag


def make_checkpoint(path: Path) -> Path:
    """A random tiny model whose scores spread over about 0.5-0.85 (a random head gives every
    query nearly the same score): "no object" is switched off and the class head amplified."""
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        model.class_embed.weight.mul_(15)
        model.class_embed.bias[-1] = -10
    return save_model(model, path, classes=CLASSES, inference=INFERENCE)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour blobs (noise upsampled), so JPEG keeps the picture recognisable."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(displayed: Image.Image) -> bytes:
    """A JPEG whose stored pixels are ``displayed`` turned a quarter left, with EXIF orientation 6
    ("rotate 90 degrees clockwise to display"), so viewers show ``displayed`` upright."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return encode(displayed.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def write_images(folder: Path) -> list[Path]:
    """JPEG, PNG and WebP files of three sizes (two JPEGs share one) and an EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"a.jpg": encode(noise_image(128, 96, 1), "JPEG", quality=90),
             "b.png": encode(noise_image(90, 120, 2), "PNG"),
             "c.webp": encode(noise_image(100, 100, 3), "WEBP", quality=90),
             "d.jpg": encode(noise_image(128, 96, 4), "JPEG", quality=90),
             "rotated.jpg": exif_rotated_jpeg(noise_image(80, 112, 5))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


@contextlib.contextmanager
def running(detector, **config):
    """A real uvicorn server around ``detector`` on a free 127.0.0.1 port; yields its URL."""
    app = serve.create_app(detector, serve.ServeConfig(**config))
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def call(url: str, path: str, body: bytes | None = None, *, method: str | None = None, ctype: str | None = None,
         params: dict | None = None) -> tuple[int, bytes, dict]:
    """One HTTP request (a fresh connection): ``(status, body, headers)``."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    query = "?" + urllib.parse.urlencode(params) if params else ""
    headers = {"Content-Type": ctype} if ctype else {}
    try:
        conn.request(method or ("GET" if body is None else "POST"), path + query, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def predict(url: str, data: bytes, ctype: str = "application/octet-stream", **params) -> dict:
    """POST /predict with a raw body; the answer's JSON (asserting 200)."""
    status, body, _ = call(url, "/predict", data, ctype=ctype, params=params or None)
    assert status == 200, body
    return json.loads(body)


def multipart(files: dict[str, tuple[str, bytes, str]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body: ``(body, content type)``; files map field -> (filename, data, type)."""
    boundary = "detrkit-test-boundary-7d1c"
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f'Content-Type: {ctype}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def assert_same_detections(got: list[dict], want: list[dict], box_tol: float = 1e-3, score_tol: float = 1e-5) -> None:
    """Two lists of ``{box, score, label or category_id, name}``: the same detections, in score order."""
    key = lambda d: -d["score"]  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert g["label"] == w.get("label", w.get("category_id")) and g["name"] == w["name"]
        assert abs(g["score"] - w["score"]) <= score_tol, (g, w)
        assert np.allclose(g["box"], w["box"], atol=box_tol, rtol=0), (g, w)
