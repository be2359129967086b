"""``detrkit serve``: a detector behind an HTTP API, with a page to try it in a browser.

Routes (every answer is JSON except the page; every error is one line ``{"error": "..."}``)::

    GET  /          the page (src/detrkit/static/: drop an image, see the boxes, move a threshold)
    GET  /health    {"status": "ok", "pending": N, "requests": N, "batches": N}
    GET  /model     classes, preset, input size, precision, backend, device and the server's limits
    POST /predict   an image (JPEG, PNG, WebP) as the raw body (Content-Type image/* or
                    application/octet-stream) or as the one file of a multipart/form-data upload;
                    parameters threshold (0..1, default --threshold) and max_detections, in the
                    query string (or as multipart fields). Answer:
                    {"detections": [{"box": [x0, y0, x1, y1], "score", "label", "name"}, ...],
                     "image": {"width", "height"}, "threshold", "model_ms", "batch"}

``box`` is absolute (x0, y0, x1, y1) in the pixels of the uploaded image as displayed, that is
after its EXIF orientation; ``label`` is the data set's category id; detections are sorted by
score, highest first, and keep those scoring above ``threshold`` (as ``detrkit predict``).
``model_ms`` is the time of the model call that served the request, ``batch`` how many images
that call held.

Batching: requests that arrive within ``max_wait_ms`` of the first waiting one (up to
``max_batch``) go through the model together, in one worker thread, so the event loop keeps
answering (``/health`` too) while a batch runs. Within a batch, only images of the same size
share a forward pass: padded to a larger neighbour's size, an image's backbone features near its
border mix in features of the padding (the mask hides the padding from the transformer only), so
a padded batch would not give the detections the image gets on its own. Same-size images need no
padding, so batching on or off gives the same detections.

The server reads no path from a request (the page's files are read once, from the package, at
start), binds 127.0.0.1 unless told otherwise, and loads weights only through
:func:`detrkit.load_model` (safetensors or ``torch.load(weights_only=True)``) or onnxruntime.
Starlette and uvicorn are the ``serve`` extra: ``pip install 'detrkit[serve]'``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import math
import socket
from importlib import resources
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from detrkit.batching import Batcher, run_grouped
from detrkit.data.images import open_rgb
from detrkit.detector import Detector
from detrkit.distributed import note_slow_bf16
from detrkit.errors import DataError, DetrkitError

try:  # the serve extra; without it this module still gives the CLI its flags and a clear error
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    MISSING_EXTRA: Optional[str] = None
except ImportError as e:
    MISSING_EXTRA = e.name
SERVE_EXTRA = "detrkit serve needs the serve extra: pip install 'detrkit[serve]'"

FORMATS = ("JPEG", "PNG", "WEBP")  # what /predict decodes (PIL format names)
RAW_TYPES = ("application/octet-stream", "image/")  # raw-body content types (image/* is sniffed by PIL)
PARAMETERS = ("threshold", "max_detections")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page loads nothing from elsewhere; the browser enforces it. blob: shows the picked image.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file in a multipart body


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How the server answers. Every default is the flag's default."""

    threshold: float = 0.5  # score threshold when a request gives none (detrkit predict's default)
    max_detections: int = 100  # at most this many detections per answer (DETR-R50 has 100 queries)
    max_batch: int = 8  # images per model call (1 = no batching); detrkit predict's batch size
    # How long the first waiting request may wait for others. A few ms cost little next to a
    # forward pass (tens of ms on a GPU, more on a CPU) and let concurrent requests share it.
    max_wait_ms: float = 5.0
    max_bytes: int = 25 * 2**20  # upload limit: a 48-megapixel phone JPEG is about 15 MB
    max_pixels: int = 50_000_000  # decoded size limit (8064 x 6048 phone photos pass; 150 MB as RGB)
    max_pending: int = 64  # requests decoding, waiting or in the model at once; more get 503

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {self.threshold}")
        for name in ("max_detections", "max_batch", "max_bytes", "max_pixels", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms}")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Reading a request
# ---------------------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The bytes of a JPEG, PNG or WebP file -> an RGB image after its EXIF orientation.

    The size is checked from the header before anything is decoded. Raises RequestError: 400
    for an empty body, bytes that are no image, or a truncated or corrupt one; 415 for another
    image format; 413 for more than ``max_pixels`` pixels.
    """
    if not data:
        raise RequestError(400, "empty body: send a JPEG, PNG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # parses the header only
            fmt, (w, h) = probe.format, probe.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"image too large: over the {max_pixels} pixels allowed (--max-pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(400, f"not an image: the {len(data)} bytes sent are not a JPEG, PNG or WebP file") from None
    if fmt not in FORMATS:
        raise RequestError(415, f"unsupported image format {fmt}: send JPEG, PNG or WebP")
    if w * h > max_pixels:
        raise RequestError(413, f"image too large: {w} x {h} = {w * h} pixels, over the {max_pixels} allowed "
                                f"(--max-pixels)")
    try:
        return open_rgb(io.BytesIO(data))  # decodes fully, applies the EXIF orientation, RGB
    except DataError:
        raise RequestError(400, f"cannot decode the {fmt} image: the file is truncated or corrupt") from None


def parse_parameters(values: dict, config: ServeConfig) -> tuple[float, int]:
    """``threshold`` and ``max_detections`` from a request's parameters (strings), or 422."""
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise RequestError(422, f"unknown parameter {', '.join(unknown)}: the parameters are {', '.join(PARAMETERS)}")
    threshold, max_detections = config.threshold, config.max_detections
    if "threshold" in values:
        try:
            threshold = float(values["threshold"])
        except ValueError:
            threshold = math.nan
        if not 0 <= threshold <= 1:  # NaN fails too
            raise RequestError(422, f"threshold must be a number in [0, 1], got {values['threshold']!r}")
    if "max_detections" in values:
        raw = values["max_detections"]
        if not (raw.isdigit() and 1 <= int(raw) <= config.max_detections):
            raise RequestError(422, f"max_detections must be a whole number in [1, {config.max_detections}], "
                                    f"got {raw!r}")
        max_detections = int(raw)
    return threshold, max_detections


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"body too large: {int(length)} bytes, over the {limit} allowed (--max-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body too large: over the {limit} bytes allowed (--max-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, dict]:
    """``(image bytes, parameters)`` from a raw-body or multipart request; query parameters win."""
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    params: dict = {}
    if ctype == "multipart/form-data":
        body = await read_body(request, max_bytes + MULTIPART_SLACK)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            async with Request(request.scope, replay).form(max_files=1) as form:
                files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
                params = {k: v for k, v in form.multi_items() if isinstance(v, str)}
                if not files:
                    raise RequestError(400, "no file in the multipart upload: send the image as the field 'file'")
                data = await files[0][1].read()
        except HTTPException as e:  # Starlette's multipart parser: malformed body or too many files
            raise RequestError(400, f"bad multipart upload: {e.detail}") from None
        if len(data) > max_bytes:
            raise RequestError(413, f"image too large: {len(data)} bytes, over the {max_bytes} allowed (--max-bytes)")
    elif ctype == "application/octet-stream" or ctype.startswith("image/"):
        data = await read_body(request, max_bytes)
    else:
        raise RequestError(415, f"unsupported content type {ctype!r}: send the image as the body (image/jpeg, "
                                f"image/png, image/webp) or as the file of a multipart/form-data upload")
    params.update(request.query_params)
    return data, params


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------
def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)  # one line


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: ``{url path: (content, content type)}``."""
    folder = resources.files("detrkit") / "static"
    files = {f"/static/{f.name}": (f.read_bytes(), STATIC_TYPES[Path(f.name).suffix])
             for f in folder.iterdir() if Path(f.name).suffix in STATIC_TYPES}
    files["/"] = files.pop("/static/index.html")
    return files


class Service:
    """The routes' state: the detector, the batcher and the counters."""

    def __init__(self, detector, config: ServeConfig) -> None:
        self.detector, self.config = detector, config
        self.batcher = Batcher(lambda images: run_grouped(detector.detect, images), config.max_batch,
                               config.max_wait_ms)
        self.info = {**detector.info(), **dataclasses.asdict(config)}
        self.pending = 0
        self.requests = 0

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "pending": self.pending, "requests": self.requests,
                             "batches": self.batcher.batches})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.info)

    async def predict(self, request: Request) -> Response:
        if self.pending >= self.config.max_pending:
            return JSONResponse({"error": f"busy: {self.pending} requests in progress; retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        self.pending += 1
        try:
            data, params = await read_upload(request, self.config.max_bytes)
            threshold, max_detections = parse_parameters(params, self.config)
            image = await asyncio.get_running_loop().run_in_executor(None, decode_image, data, self.config.max_pixels)
            det, batch, ms = await self.batcher.submit(image)
        except RequestError as e:
            return _error(e.status, str(e))
        finally:
            self.pending -= 1
        self.requests += 1
        return JSONResponse(answer(det, image.size, threshold, max_detections, batch, ms))


def answer(det: dict, size: tuple[int, int], threshold: float, max_detections: int, batch: int,
           ms: float) -> dict:
    """The /predict JSON from one image's detections: those above ``threshold``, best first."""
    scores = det["scores"].tolist()
    order = sorted((i for i, s in enumerate(scores) if s > threshold), key=lambda i: -scores[i])[:max_detections]
    boxes, labels = det["boxes"].tolist(), det["labels"].tolist()
    return {"detections": [{"box": boxes[i], "score": scores[i], "label": labels[i], "name": det["names"][i]}
                           for i in order],
            "image": {"width": size[0], "height": size[1]}, "threshold": threshold,
            "model_ms": round(ms, 2), "batch": batch}


def create_app(detector, config: ServeConfig = ServeConfig()) -> "Starlette":
    """The ASGI application around ``detector`` (a :class:`Detector`, or any object with its
    ``detect`` and ``info``)."""
    if MISSING_EXTRA:
        raise DetrkitError(f"{SERVE_EXTRA} (missing: {MISSING_EXTRA})")
    service = Service(detector, config)
    routes = [Route("/health", service.health, methods=["GET"]), Route("/model", service.model, methods=["GET"]),
              Route("/predict", service.predict, methods=["POST"])]
    for path, (content, ctype) in static_files().items():
        routes.append(Route(path, _static(content, ctype), methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    async def http_error(request, exc: HTTPException) -> Response:  # 404, 405 as one-line JSON
        return _error(exc.status_code, exc.detail)

    async def internal_error(request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


def _static(content: bytes, ctype: str):
    async def endpoint(request: Request) -> Response:
        return Response(content, media_type=ctype, headers=PAGE_HEADERS)
    return endpoint


# ---------------------------------------------------------------------------------------------
# Command line: `detrkit serve`
# ---------------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``detrkit serve`` (``--debug`` is the CLI's common flag, not added here)."""
    parser.description = ("POST /predict (an image: JPEG, PNG or WebP) answers with JSON detections; GET / is a page "
                          "to try it; GET /health, GET /model. See docs/serving.md.")
    defaults = ServeConfig()
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="checkpoint (detrkit, official DETR / RT-DETR .pth or Hugging Face) or an exported .onnx file "
                             "(onnxruntime)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 listens on every interface (default: 127.0.0.1, "
                             "this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... for checkpoints; .onnx files run "
                        "on onnxruntime's CPU provider (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast for checkpoints (faster on GPUs and AMX CPUs) (default: fp32)")
    for name, typ, help in [
        ("threshold", float, "score threshold of requests that give none"),
        ("max_detections", int, "most detections per answer, and the largest max_detections a request may ask"),
        ("max_batch", int, "most images per model call; 1 turns batching off"),
        ("max_wait_ms", float, "how long a request may wait for others to share its model call"),
        ("max_bytes", int, "largest upload in bytes (413 above)"),
        ("max_pixels", int, "largest image in pixels, width x height (413 above)"),
        ("max_pending", int, "most requests in progress at once (503 above)"),
    ]:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=getattr(defaults, name),
                            help=f"{help} (default: {getattr(defaults, name)})")
    parser.add_argument("--access-log", action="store_true", help="print one line per request (default: off)")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise DetrkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_serve(args: argparse.Namespace) -> int:
    """``detrkit serve``: load the model, listen, print the address, serve until Ctrl+C."""
    if MISSING_EXTRA:
        raise DetrkitError(f"{SERVE_EXTRA} (missing: {MISSING_EXTRA})")
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    note_slow_bf16(args.precision, args.device)
    detector = Detector(args.weights, device=args.device, precision=args.precision)
    sock = listen(args.host, args.port)
    app = create_app(detector, config)
    host, port = sock.getsockname()[:2]
    info = detector.info()
    print(f"detrkit serve: http://{f'[{host}]' if ':' in host else host}:{port}/ ({info['weights']}: "
          f"{info['preset'] or 'custom model'}, {info['backend']} on {info['device']}, {info['precision']}; "
          f"max batch {config.max_batch}, max wait {config.max_wait_ms:g} ms); Ctrl+C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=args.access_log))
    server.run(sockets=[sock])
    if server.should_exit:
        # Stopped by Ctrl+C (or SIGTERM). uvicorn re-raises the signal after its shutdown, but
        # asyncio's runner may swallow that KeyboardInterrupt when the serving task is already
        # done: end as every other command does on Ctrl+C, whichever way the race went.
        raise KeyboardInterrupt
    return 0
