"""detrkit serve against a real uvicorn server on a free localhost port: the same detections as
`detrkit predict` (checkpoint and ONNX), every bad request refused with a 4xx and the server still
up, EXIF orientation, batching on = off, /health during a batch, and a bounded load run."""
import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from detrkit import load_model, serve
from detrkit.batching import Batcher
from detrkit.cli import main
from detrkit.export import export_onnx
from serve_helpers import (
    CLASSES, assert_same_detections, call, encode, make_checkpoint, multipart, noise_image, predict, running,
    write_images,
)

THRESHOLD = 0.75  # between the tiny model's scores (about 0.5-0.9), so some detections are dropped


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def onnx_file(checkpoint):
    return export_onnx(load_model(checkpoint), checkpoint.parent / "tiny.onnx", image_size=(96, 128),
                       dynamic_batch=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def detector(checkpoint):
    return serve.Detector(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(detector):
    with running(detector) as url:
        yield url


def cli_predictions(weights, files, out) -> dict[str, list[dict]]:
    # --batch-size 1: a batch pads images of different sizes to one size, which changes their
    # detections; the server batches only same-size images, so it matches predict image by image.
    assert main(["predict", *map(str, files), "--weights", str(weights), "--threshold", str(THRESHOLD),
                 "--batch-size", "1", "--out", str(out), "--device", "cpu"]) == 0
    return {Path(r["file"]).name: r["detections"] for r in json.loads((out / "detections.json").read_text())}


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_predict_equals_detrkit_predict(kind, checkpoint, onnx_file, images, tmp_path):
    weights = checkpoint if kind == "checkpoint" else onnx_file
    want = cli_predictions(weights, images, tmp_path / "predict")
    assert sum(map(len, want.values())) > 0 and sum(map(len, want.values())) < 10 * len(images)  # some kept, some not
    with running(serve.Detector(weights, device="cpu")) as url:
        info = json.loads(call(url, "/model")[1])
        assert info["backend"] == ("pytorch" if kind == "checkpoint" else "onnxruntime")
        assert info["classes"] == CLASSES and info["preset"] == "detr_r18_tiny"
        for i, f in enumerate(images):
            if i % 2:  # raw body and multipart upload, in turn
                got = predict(url, f.read_bytes(), "image/" + f.suffix[1:].replace("jpg", "jpeg"), threshold=THRESHOLD)
            else:
                body, ctype = multipart({"file": (f.name, f.read_bytes(), "application/octet-stream")},
                                        {"threshold": str(THRESHOLD)})
                status, data, _ = call(url, "/predict", body, ctype=ctype)
                assert status == 200, data
                got = json.loads(data)
            with Image.open(f) as im:
                assert (got["image"]["width"], got["image"]["height"]) == ImageOps.exif_transpose(im).size
            assert got["threshold"] == THRESHOLD and all(d["score"] > THRESHOLD for d in got["detections"])
            assert [d["score"] for d in got["detections"]] == sorted((d["score"] for d in got["detections"]),
                                                                      reverse=True)
            assert_same_detections(got["detections"], want[f.name], box_tol=0.01)  # predict rounds to 0.01 px


def test_max_detections_keeps_the_best(server, images):
    full = predict(server, images[0].read_bytes(), threshold=0)["detections"]
    best = predict(server, images[0].read_bytes(), threshold=0, max_detections=3)["detections"]
    assert len(full) == 10 and best == full[:3]


def test_exif_rotated_jpeg_gets_boxes_in_its_displayed_orientation(server, images):
    rotated = images[-1].read_bytes()
    with Image.open(images[-1]) as im:
        stored = im.convert("RGB")
        displayed = ImageOps.exif_transpose(im).convert("RGB")
    assert stored.size == (112, 80) and displayed.size == (80, 112)
    got = predict(server, rotated, "image/jpeg", threshold=0)
    assert (got["image"]["width"], got["image"]["height"]) == (80, 112)
    for d in got["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 112
    # The same pixels as the displayed picture, sent losslessly without any EXIF: the same boxes.
    upright = predict(server, encode(displayed, "PNG"), "image/png", threshold=0)
    assert_same_detections(got["detections"], upright["detections"], score_tol=1e-4)
    # Read as stored (orientation ignored), the image would get other boxes.
    sideways = predict(server, encode(stored, "PNG"), "image/png", threshold=0)
    assert (sideways["image"]["width"], sideways["image"]["height"]) == (112, 80)


def gif() -> bytes:
    return encode(noise_image(32, 32, 0), "GIF")


def big_png() -> bytes:  # 200 x 200 = 40 000 pixels in a few hundred bytes
    return encode(Image.new("RGB", (200, 200), (90, 120, 30)), "PNG")


@pytest.fixture(scope="module")
def strict_server(detector):
    with running(detector, max_bytes=60_000, max_pixels=20_000, max_detections=20) as url:
        yield url


@pytest.mark.parametrize("case,body,ctype,params,status", [
    ("text", b"hello, this is not a picture", "image/jpeg", None, 400),
    ("truncated jpeg", "first 2000 bytes", "image/jpeg", None, 400),
    ("empty body", b"", "image/jpeg", None, 400),
    ("no body at all", None, "image/jpeg", None, 400),
    ("wrong content type", "jpeg", "text/plain", None, 415),
    ("json content type", "jpeg", "application/json", None, 415),
    ("form content type", "jpeg", "application/x-www-form-urlencoded", None, 415),
    ("gif", "gif", "image/gif", None, 415),
    ("too many bytes", b"\xff" * 70_000, "image/jpeg", None, 413),
    ("too many bytes, multipart", "multipart 70000", None, None, 413),
    ("too many pixels", "big png", "image/png", None, 413),
    ("threshold not a number", "jpeg", "image/jpeg", {"threshold": "high"}, 422),
    ("threshold above 1", "jpeg", "image/jpeg", {"threshold": "1.5"}, 422),
    ("threshold below 0", "jpeg", "image/jpeg", {"threshold": "-0.1"}, 422),
    ("threshold nan", "jpeg", "image/jpeg", {"threshold": "nan"}, 422),
    ("max_detections 0", "jpeg", "image/jpeg", {"max_detections": "0"}, 422),
    ("max_detections over the server's", "jpeg", "image/jpeg", {"max_detections": "21"}, 422),
    ("unknown parameter", "jpeg", "image/jpeg", {"confidence": "0.5"}, 422),
    ("multipart without a file", "multipart no file", None, None, 400),
    ("multipart without a boundary", "jpeg", "multipart/form-data", None, 400),
    ("two files", "multipart two files", None, None, 400),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(strict_server, images, case, body, ctype, params, status):
    jpeg = images[0].read_bytes()
    made = {"first 2000 bytes": jpeg[:2000], "jpeg": jpeg, "gif": gif(), "big png": big_png()}
    if body == "multipart 70000":
        body, ctype = multipart({"file": ("x.jpg", b"\xff" * 70_000, "image/jpeg")})
    elif body == "multipart no file":
        body, ctype = multipart({}, {"threshold": "0.5"})
    elif body == "multipart two files":
        body, ctype = multipart({"file": ("a.jpg", jpeg, "image/jpeg"), "other": ("b.jpg", jpeg, "image/jpeg")})
    else:
        body = made.get(body, body)
    got, data, headers = call(strict_server, "/predict", body, method="POST", ctype=ctype, params=params)
    assert got == status, data
    assert headers["content-type"] == "application/json" and b"\n" not in data
    answer = json.loads(data)
    assert list(answer) == ["error"] and answer["error"]
    assert call(strict_server, "/health")[0] == 200
    assert predict(strict_server, jpeg, "image/jpeg")["image"] == {"width": 128, "height": 96}  # still serving


@pytest.mark.parametrize("method,path,status", [("GET", "/predict", 405), ("GET", "/nowhere", 404),
                                                ("POST", "/health", 405), ("GET", "/static/../serve.py", 404)])
def test_wrong_routes_answer_json(server, method, path, status):
    got, data, _ = call(server, path, method=method)
    assert got == status and list(json.loads(data)) == ["error"]


def test_page_is_served_by_detrkit_alone(server):
    status, html, headers = call(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]  # the browser loads nothing else
    html = html.decode()
    assert 'src="/static/app.js"' in html and 'href="/static/style.css"' in html
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        status, text, headers = call(server, path)
        assert status == 200 and headers["content-type"].startswith(kind)
        assert "https://" not in text.decode()  # no CDN
    assert "https://" not in html and "cdn" not in html.lower()


def test_batching_gives_the_same_detections_as_no_batching(detector, images):
    files = [images[0], images[3], images[1], images[0]]  # three of 128 x 96 and one of 90 x 120
    with running(detector, max_batch=1) as url:
        alone = [predict(url, f.read_bytes(), threshold=0) for f in files]
    assert all(a["batch"] == 1 for a in alone)
    # The batch closes when four requests are in (the wait is long enough for all four).
    with running(detector, max_batch=4, max_wait_ms=5000) as url:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda f: predict(url, f.read_bytes(), threshold=0), files))
        assert json.loads(call(url, "/health")[1])["batches"] == 1
    assert [t["batch"] for t in together] == [3, 3, 1, 3]  # one forward pass per image size
    for a, t in zip(alone, together):
        assert_same_detections(t["detections"], a["detections"], score_tol=1e-4)


class BlockingDetector:
    """Holds its model call until released: shows what the server does while a batch runs."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def info(self):
        return {"classes": CLASSES}

    def detect(self, images):
        self.started.set()
        assert self.release.wait(60)
        return [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([7]), "names": ["square"]} for _ in images]


def test_health_answers_while_a_batch_runs(images):
    blocking = BlockingDetector()
    with running(blocking, max_wait_ms=0) as url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(predict, url, images[0].read_bytes())
        assert blocking.started.wait(60)
        status, data, _ = call(url, "/health")  # the model call is still blocked
        assert status == 200 and json.loads(data)["pending"] == 1 and not pending.done()
        blocking.release.set()
        got = pending.result(60)
    assert got["detections"] == [{"box": [1.0, 2.0, 3.0, 4.0], "score": pytest.approx(0.9), "label": 7,
                                  "name": "square"}]


def test_a_full_server_answers_503_and_recovers(images):
    blocking, jpeg = BlockingDetector(), images[0].read_bytes()
    with running(blocking, max_wait_ms=0, max_pending=1) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(predict, url, jpeg)
        assert blocking.started.wait(60)  # the one request allowed is in the model
        status, data, headers = call(url, "/predict", jpeg, ctype="image/jpeg")
        assert status == 503 and headers["retry-after"] == "1" and list(json.loads(data)) == ["error"]
        assert call(url, "/health")[0] == 200
        blocking.release.set()
        assert len(first.result(60)["detections"]) == 1
        assert len(predict(url, jpeg)["detections"]) == 1  # room again


def test_batcher_batches_answers_each_item_and_survives_errors():
    sizes = []

    def run(items):
        sizes.append(len(items))
        if "bad" in items:
            raise RuntimeError("model failed")
        return [f"{item}!" for item in items]

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_wait_ms=20)
        await batcher.start()
        try:
            got = await asyncio.gather(*(batcher.submit(str(i)) for i in range(10)))
            failed = await asyncio.gather(batcher.submit("x"), batcher.submit("bad"), return_exceptions=True)
            after = await batcher.submit("y")
        finally:
            await batcher.stop()
        return got, failed, after

    got, failed, after = asyncio.run(scenario())
    assert got == [f"{i}!" for i in range(10)] and sizes[:3] == [4, 4, 2]
    assert all(isinstance(f, RuntimeError) for f in failed) and after == "y!"


def test_load_200_requests_from_8_clients(server, images):
    want = {f.name: predict(server, f.read_bytes(), threshold=0.5) for f in images}
    before = json.loads(call(server, "/health")[1])["requests"]
    jobs = [images[i % len(images)] for i in range(200)]

    def client(k):  # each of the 8 clients sends every 8th request, one after the other
        return [(f.name, call(server, "/predict", f.read_bytes(), ctype="application/octet-stream",
                              params={"threshold": 0.5})) for f in jobs[k::8]]

    with ThreadPoolExecutor(8) as pool:
        answers = [a for part in pool.map(client, range(8)) for a in part]
    assert len(answers) == 200 and all(status == 200 for _, (status, _, _) in answers)
    batches = []
    for name, (_, data, _) in answers:
        got = json.loads(data)
        assert_same_detections(got["detections"], want[name]["detections"], score_tol=1e-4)
        batches.append(got["batch"])
    assert json.loads(call(server, "/health")[1])["requests"] == before + 200  # none lost
    print(f"model calls per batch size: { {b: batches.count(b) for b in sorted(set(batches))} }")


def test_serve_command_listens_on_localhost_and_stops_on_ctrl_c(checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "detrkit", "serve", "--weights", str(checkpoint), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("detrkit serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2].rstrip("/")
        assert json.loads(call(url, "/health")[1])["status"] == "ok"
        assert json.loads(call(url, "/model")[1])["max_batch"] == serve.ServeConfig.max_batch
    finally:
        proc.send_signal(signal.SIGINT)
        status = proc.wait(60)
    assert status == 130 and "Traceback" not in proc.stderr.read()  # the CLI's status for Ctrl+C, no crash


def test_missing_extra_is_named(checkpoint):
    code = ("import sys; sys.modules['uvicorn'] = None; from detrkit.cli import main; "
            f"sys.exit(main(['serve', '--weights', {str(checkpoint)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pip install 'detrkit[serve]'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag,value", [("--threshold", "2"), ("--max-batch", "0"), ("--max-bytes", "0")])
def test_bad_flags_exit_2(checkpoint, capsys, flag, value):
    assert main(["serve", "--weights", str(checkpoint), flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_every_serve_flag_is_documented_with_its_default():
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and a.help.strip() for a in actions)
    defaults = serve.ServeConfig()
    fields = {f.name for f in dataclasses.fields(defaults)}
    assert fields <= {a.dest for a in actions}  # every setting is a flag
    for a in actions:
        if a.dest in fields:
            assert a.default == getattr(defaults, a.dest) and f"(default: {a.default})" in a.help
