"""`groundkit serve`: the page and the JSON API answer right, in process (FastAPI's TestClient).

image_text: the `salient` test method (tests/serve_helpers.py), a real Predictor behind a real run.
text_video: a real crosskd Retriever trained for a few steps on the tiny built-in retrieval world.
"""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
import serve_helpers as sh
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    world, crosskd = sh.crosskd_run(tmp_path_factory.getbasetemp())
    salient = sh.make_salient_run(tmp_path_factory.mktemp("serve_app") / "salient")
    return salient, crosskd


@pytest.fixture
def client(runs, monkeypatch):
    from fastapi.testclient import TestClient

    from groundkit.serve import create_app, load_runs

    sh.register(monkeypatch)
    salient, crosskd = runs
    served = load_runs([str(salient), f"tv={crosskd}"])
    with TestClient(create_app(served)) as c:
        c.served = served
        yield c


def _upload(img_bytes, name="photo.png", ctype="image/png"):
    return {"image": (name, img_bytes, ctype)}


def test_health_and_runs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["salient"]["kind"] == "image_text" and runs["salient"]["served"]
    assert runs["tv"]["kind"] == "text_video" and runs["tv"]["method"] == "crosskd"
    assert runs["tv"]["videos_with_frames"] == 0  # the built-in world stores features only
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="ground-form"' in page.text and 'value="tv"' in page.text  # first run chosen, both listed
    page = client.get("/?run=tv")
    assert 'id="search-form"' in page.text and 'id="ground-form"' not in page.text
    assert client.get("/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/app.js").headers["content-type"].startswith("text/javascript")


def test_ground_api_gives_the_salient_box(client):
    img = sh.square_image(200, 150, (40, 30, 120, 90))
    r = client.post(
        "/api/ground", data={"run": "salient", "text": ["the red square", "it"]}, files=_upload(sh.png_bytes(img))
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["width"], out["height"]) == (200, 150) and out["method"] == "salient"
    assert [x["text"] for x in out["results"]] == ["the red square", "it"]
    assert out["results"][0]["box"] == [40.0, 30.0, 120.0, 90.0]
    assert out["results"][0]["score"] == pytest.approx(80 * 60 / (200 * 150))
    assert "image_png" not in out


def test_ground_draws_the_box(client):
    img = sh.square_image(200, 150, (40, 30, 120, 90), colour=(30, 30, 220))
    r = client.post(
        "/api/ground",
        data={"run": "salient", "text": "blue", "draw": "true"},
        files=_upload(sh.png_bytes(img, "JPEG"), "x.jpg"),
    )
    assert r.status_code == 200
    drawn = Image.open(io.BytesIO(base64.b64decode(r.json()["image_png"])))
    assert drawn.format == "PNG" and drawn.size == (200, 150)
    a = np.asarray(drawn.convert("RGB")).astype(int)
    # the box outline (first colour, #ff2d55) runs along the right edge x=120, away from the label
    assert np.abs(a[60, 119] - [255, 45, 85]).sum() < 60
    assert np.abs(a[140, 190] - [128, 128, 128]).sum() < 40  # the background is untouched


def test_ground_page_shows_image_and_coordinates(client):
    img = sh.square_image(1280, 960, (400, 300, 1200, 900))
    r = client.post("/ground", data={"run": "salient", "text": "the square"}, files=_upload(sh.png_bytes(img)))
    assert r.status_code == 200
    src = re.search(r'id="result-image" src="data:image/png;base64,([^"]+)"', r.text).group(1)
    shown = Image.open(io.BytesIO(base64.b64decode(src)))
    assert shown.size == (800, 600)  # drawn at display size, coordinates in original pixels
    cells = dict(re.findall(r'<td class="(x1|y1|x2|y2)">([\d.]+)</td>', r.text))
    assert cells == {"x1": "400.0", "y1": "300.0", "x2": "1200.0", "y2": "900.0"}
    assert 'value="the square"' in r.text  # the form keeps the expression


def test_ground_real_photo_is_deterministic(client):
    data = sh.china_jpg().read_bytes()
    a = client.post(
        "/api/ground", data={"run": "salient", "text": "the temple"}, files=_upload(data, "china.jpg", "image/jpeg")
    )
    b = client.post(
        "/api/ground", data={"run": "salient", "text": "the temple"}, files=_upload(data, "china.jpg", "image/jpeg")
    )
    assert a.status_code == 200 and a.json() == b.json()
    x1, y1, x2, y2 = a.json()["results"][0]["box"]
    assert (a.json()["width"], a.json()["height"]) == (640, 427)
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 427


def test_search_matches_the_retriever(client):
    run = next(r for r in client.served if r.name == "tv")
    expected = run.predictor.search("a brown dog is jumping on the beach", k=5)
    r = client.post("/api/search", json={"run": "tv", "text": "  a brown dog is jumping on the beach ", "k": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == "a brown dog is jumping on the beach" and out["frames_on_disk"] is False
    assert [h["video_id"] for h in out["results"]] == [v for v, _ in expected]
    assert [h["score"] for h in out["results"]] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert [h["rank"] for h in out["results"]] == [1, 2, 3, 4, 5] and all(h["frames"] == [] for h in out["results"])
    page = client.get("/search", params={"run": "tv", "text": "a brown dog is jumping on the beach", "k": "5"})
    assert page.status_code == 200
    assert re.findall(r'<span class="vid">([^<]+)</span>', page.text) == [v for v, _ in expected]
    assert 'id="no-frames"' in page.text and "no frames on disk" in page.text
    # each hit carries a caption the store holds for its video (the built-in world stores them)
    caps = [run.predictor.video_captions(v) for v, _ in expected]
    assert all(caps) and [h["caption"] for h in out["results"]] == [c[0] for c in caps]
    shown = re.findall(r'<span class="caption">([^<]+)</span>', page.text)
    assert shown == [html.escape(c[0]) for c in caps]


def test_search_shows_frames_from_disk(runs, monkeypatch, tmp_path):
    """Frames of a collection on disk: a folder of images for one video, an mp4 for another."""
    import av
    from fastapi.testclient import TestClient

    from groundkit.serve import create_app, load_runs

    _, crosskd = runs
    served = load_runs([str(crosskd)], videos=tmp_path)
    ids = served[0].predictor.video_ids
    folder = tmp_path / ids[0]
    folder.mkdir()
    for i in range(6):
        sh.square_image(64, 48, (8 * i, 8, 8 * i + 10, 30)).save(folder / f"{i:03d}.jpg")
    c = av.open(str(tmp_path / f"{ids[1]}.mp4"), "w")
    s = c.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(16):
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 15, np.uint8), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    (tmp_path / "notes").mkdir()  # a folder without frames is not a video
    served = load_runs([str(crosskd)], videos=tmp_path)  # listed at start
    assert len(served[0].frames) == 2
    with TestClient(create_app(served)) as client:
        out = client.post("/api/search", json={"text": "a dog", "k": 16}).json()  # one run: its name may be left out
        hits = {h["video_id"]: h["frames"] for h in out["results"]}
        assert out["frames_on_disk"] is True and len(hits) == 16
        assert len(hits[ids[0]]) == 4 and len(hits[ids[1]]) == 4
        assert sum(1 for f in hits.values() if f) == 2
        for url in hits[ids[0]] + hits[ids[1]]:
            r = client.get(url)
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(r.content)).format == "JPEG"
        grey = [np.asarray(Image.open(io.BytesIO(client.get(u).content)))[20, 30, 0] for u in hits[ids[1]]]
        assert grey == sorted(grey) and grey[-1] - grey[0] > 100  # spread over the video, in order
        assert client.get(hits[ids[0]][0][:-1] + "4").status_code == 404  # 4 frames: 0..3
        page = client.get("/search", params={"text": "a dog", "k": "16"})
        assert page.text.count('<img src="/frames/') == 8 and 'id="no-frames"' not in page.text


def test_model_error_answers_500_and_the_server_goes_on(client):
    img = sh.png_bytes(sh.square_image())
    r = client.post("/api/ground", data={"run": "salient", "text": f"please {sh.FAIL_WORD}"}, files=_upload(img))
    assert r.status_code == 500
    assert r.json() == {
        "error": "the model of run 'salient' failed on this input: RuntimeError: salient was asked to fail",
        "status": 500,
    }
    page = client.post("/ground", data={"run": "salient", "text": sh.FAIL_WORD}, files=_upload(img))
    assert page.status_code == 500 and "salient was asked to fail" in page.text and 'id="error"' in page.text
    assert 'id="ground-form"' in page.text  # the error page keeps the form
    ok = client.post("/api/ground", data={"run": "salient", "text": "fine"}, files=_upload(img))
    assert ok.status_code == 200 and ok.json()["results"][0]["box"] == [40.0, 30.0, 120.0, 90.0]


def test_regions_text_runs_are_listed_with_a_note(runs):
    from fastapi.testclient import TestClient

    from groundkit.methods.base import Predictor
    from groundkit.serve import ServedRun, create_app

    class Regions(Predictor):
        kind = "regions_text"

    with TestClient(create_app([ServedRun("w21", "wang21", "phrase grounding", "regions_text", Regions())])) as c:
        page = c.get("/")
        assert "precomputed region proposals" in page.text and "groundkit predict phrase" in page.text
        assert 'id="ground-form"' not in page.text and 'id="search-form"' not in page.text
        r = c.post("/api/ground", data={"run": "w21", "text": "x"}, files=_upload(sh.png_bytes(sh.square_image())))
        assert (
            r.status_code == 400
            and r.json()["error"] == "run 'w21' is a regions_text model; it does not do image grounding"
        )
        assert c.get("/api/runs").json()["runs"][0]["served"] is False


def test_no_run_page_and_cli_error(capsys):
    from fastapi.testclient import TestClient

    from groundkit.cli import build_parser, main
    from groundkit.serve import create_app

    with TestClient(create_app([])) as c:
        page = c.get("/")
        assert (
            page.status_code == 200 and "No model run is loaded" in page.text and "groundkit serve --run" in page.text
        )
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("groundkit: error: give at least one --run RUN_DIR")
    assert main(["serve", "--run", "/nonexistent/run"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--run", "r"])
    assert (args.host, args.port, args.max_upload_mb, args.max_text) == ("127.0.0.1", 8000, 8.0, 200)


def test_security_headers_hosts_and_no_docs(runs, monkeypatch):
    from fastapi.testclient import TestClient

    from groundkit.serve import create_app, load_runs
    from groundkit.serve.cli import LOOPBACK_NAMES, is_loopback

    sh.register(monkeypatch)
    app = create_app(load_runs([str(runs[0])]), allowed_hosts=LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        r = c.get("/")
        assert r.status_code == 200
        assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        for path in ("/docs", "/redoc", "/openapi.json"):  # FastAPI's pages load assets from a CDN: off
            assert c.get(path).status_code == 404
        r = c.get("/", headers={"host": "evil.example"})  # DNS rebinding
        assert r.status_code == 400 and "this server answers only to 127.0.0.1, ::1, localhost" in r.text
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1", "LOCALHOST"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("127.0.0.1.evil.example", "[::2]:80", "", "evil:8000"):
            assert c.get("/healthz", headers={"host": host}).status_code == 400, host
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
