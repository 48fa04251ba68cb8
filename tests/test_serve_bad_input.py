"""`groundkit serve` refuses bad input with the right HTTP status and a clear message, on the JSON
API and on the HTML page, and no path in a request reaches the file system."""

from __future__ import annotations

import struct
import sys
import zlib

import pytest
import serve_helpers as sh
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

MAX_UPLOAD = 256 * 1024  # small limits keep the oversized inputs small
MAX_TEXT = 50


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    _, crosskd = sh.crosskd_run(tmp_path_factory.getbasetemp())
    salient = sh.make_salient_run(tmp_path_factory.mktemp("serve_bad") / "salient")
    return salient, crosskd


@pytest.fixture
def client(runs, monkeypatch):
    from fastapi.testclient import TestClient

    from groundkit.serve import Limits, create_app, load_runs

    sh.register(monkeypatch)
    limits = Limits(max_upload_bytes=MAX_UPLOAD, max_pixels=4_000_000, max_text=MAX_TEXT)
    served = load_runs([str(runs[0]), f"tv={runs[1]}"], limits=limits)
    with TestClient(create_app(served, limits)) as c:
        yield c


GOOD = sh.png_bytes(sh.square_image())


def ground(
    client, data: bytes | None = GOOD, text="the square", run="salient", name="a.png", ctype="image/png", html=False
):
    files = {"image": (name, data, ctype)} if data is not None else None
    form = {"run": run, "text": text} if run is not None else {"text": text}
    return client.post("/ground" if html else "/api/ground", data=form, files=files)


def error_of(r) -> str:
    if r.headers["content-type"].startswith("application/json"):
        body = r.json()
        assert body["status"] == r.status_code
        return body["error"]
    import re

    m = re.search(r'<div id="error" class="card error" role="alert">([^<]*)</div>', r.text)
    assert m, r.text[-500:]
    import html

    return html.unescape(m.group(1))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("html", [False, True])
def test_oversized_upload_is_413(client, html):
    big = b"\xff\xd8" + bytes(MAX_UPLOAD + 100 * 1024)  # over the limit plus the form's allowance
    r = ground(client, big, name="big.jpg", ctype="image/jpeg", html=html)
    assert r.status_code == 413
    assert error_of(r) == "the request is larger than 320 KB (the upload limit plus the form around it)"
    just_over = bytes(MAX_UPLOAD + 1000)  # the body fits the allowance; the file itself does not
    r = ground(client, just_over, html=html)
    assert r.status_code == 413 and error_of(r) == "the image file is larger than the 256 KB limit"


@pytest.mark.parametrize("html", [False, True])
def test_non_image_with_an_image_name_is_415(client, html):
    r = ground(
        client, b"#!/bin/sh\necho this is not a picture\n" * 20, name="holiday.jpg", ctype="image/jpeg", html=html
    )
    assert r.status_code == 415
    assert error_of(r) == "the file is not an image (its content is none of: JPEG, PNG, WebP, BMP, GIF)"


def test_unsupported_and_damaged_images(client):
    import io

    buf = io.BytesIO()
    sh.square_image().save(buf, format="TIFF")
    r = ground(client, buf.getvalue(), name="a.png")
    assert r.status_code == 415 and error_of(r) == "unsupported image type TIFF: send JPEG, PNG, WebP, BMP, GIF"
    r = ground(client, GOOD[: len(GOOD) // 2])  # a truncated PNG
    assert r.status_code == 400 and error_of(r).startswith("the image file is damaged or truncated")
    r = ground(client, b"")
    assert r.status_code == 400 and error_of(r) == "the uploaded file is empty: choose an image file"
    r = ground(client, None)
    assert r.status_code == 400 and error_of(r) == "no image was uploaded: choose an image file (the 'image' field)"


def test_decompression_bombs_are_400(client):
    # a real 1-bit PNG of 4,000 x 4,000 = 16 MP in a few kB: over this server's 4 MP limit
    import io

    buf = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 10_000
    r = ground(client, buf.getvalue())
    assert r.status_code == 400
    assert (
        error_of(r)
        == "the image is 4000x4000 = 16,000,000 pixels; the limit is 4,000,000 pixels (decompression-bomb guard)"
    )
    # a header claiming 100,000 x 100,000 (10 gigapixels; PIL's own guard fires at open)
    r = ground(client, png_header_only(100_000, 100_000), html=True)
    assert r.status_code == 400 and "decompression-bomb guard" in error_of(r)
    # just under PIL's own guard, over ours: refused from the header, before any decoding
    r = ground(client, png_header_only(9000, 9000))
    assert r.status_code == 400 and error_of(r).startswith("the image is 9000x9000 = 81,000,000 pixels")


@pytest.mark.parametrize("html", [False, True])
def test_expression_checks(client, html):
    cases = [
        ("", "the expression is empty: type what to look for"),
        ("   \t ", "the expression is empty: type what to look for"),
        ("x" * (MAX_TEXT + 1), f"the expression is {MAX_TEXT + 1} characters long; the limit is {MAX_TEXT}"),
        ("bad\x00byte", "the expression holds control characters"),
    ]
    for text, message in cases:
        r = ground(client, text=text, html=html)
        assert (r.status_code, error_of(r)) == (400, message)
        if html:
            r = client.get("/search", params={"run": "tv", "text": text})
        else:
            r = client.post("/api/search", json={"run": "tv", "text": text})
        assert (r.status_code, error_of(r)) == (400, message)
    r = client.post(
        "/api/ground", data={"run": "salient", "text": ["a"] * 9}, files={"image": ("a.png", GOOD, "image/png")}
    )
    assert r.status_code == 400 and error_of(r) == "9 expressions; at most 8 at a time"
    r = ground(client, text="x" * MAX_TEXT, html=html)  # exactly at the limit is fine
    assert r.status_code == 200
    if html:  # the page's text fields never cut a pasted text (no maxlength): too long is said, not truncated
        for page in (client.get("/", params={"run": "salient"}).text, client.get("/", params={"run": "tv"}).text):
            assert "maxlength" not in page and f'data-max-text="{MAX_TEXT}"' in page


def test_a_query_the_model_cannot_read_is_the_clients_to_fix(client):
    r = client.post("/api/search", json={"run": "tv", "text": "xyzzyq qwzzrt"})
    assert r.status_code == 400 and "none of its words is known" in error_of(r)


def test_search_parameter_checks(client):
    for k, message in [
        (0, "k must be from 1 to 50; got 0"),
        (51, "k must be from 1 to 50; got 51"),
        ("ten", "k must be a whole number from 1 to 50"),
        (2.5, "k must be a whole number from 1 to 50"),
        (True, "k must be a whole number from 1 to 50"),
    ]:
        r = client.post("/api/search", json={"run": "tv", "text": "a dog", "k": k})
        assert (r.status_code, error_of(r)) == (400, message)
    r = client.get("/search", params={"run": "tv", "text": "a dog", "k": "-3"})
    assert (r.status_code, error_of(r)) == (400, "k must be from 1 to 50; got -3")
    r = client.post(
        "/api/search", content=b"run=tv&text=a", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 400 and error_of(r).startswith("the body must be JSON")
    r = client.post("/api/search", json=["tv", "a dog"])
    assert r.status_code == 400 and error_of(r).startswith("the body must be a JSON object")
    r = client.post("/api/search", json={"text": "a dog"})  # two runs loaded: the run must be named
    assert r.status_code == 400 and error_of(r) == "choose a run (the 'run' field); loaded runs: salient, tv"
    r = client.post("/api/search", json={"run": "salient", "text": "a dog"})
    assert r.status_code == 400 and error_of(r) == "run 'salient' is a image_text model; it does not do video search"


def test_unknown_run_and_routes_are_404(client):
    r = client.post("/api/search", json={"run": "nope", "text": "a dog"})
    assert (r.status_code, error_of(r)) == (404, "unknown run 'nope'; loaded runs: salient, tv")
    r = ground(client, run="nope", html=True)
    assert (r.status_code, error_of(r)) == (404, "unknown run 'nope'; loaded runs: salient, tv")
    r = client.get("/?run=nope")
    assert r.status_code == 404 and error_of(r).startswith("unknown run 'nope'")
    r = client.get("/no/such/page")
    assert (r.status_code, error_of(r)) == (404, "no such page")
    r = client.get("/api/nothing")
    assert (r.status_code, r.json()) == (404, {"error": "no such page", "status": 404})
    r = client.get("/api/ground")
    assert (r.status_code, error_of(r)) == (405, "method not allowed here")
    r = client.get("/frames/tv/video0001/0")  # the built-in world has no frames
    assert (r.status_code, error_of(r)) == (404, "no frames for video 'video0001' in run 'tv'")


MARK = "gk-traversal-mark"
TRAVERSALS = [
    f"../../../../{MARK}/etc/passwd",
    f"/{MARK}/etc/passwd",
    f"..%2F..%2F{MARK}%2Fpasswd",
    f"....//....//{MARK}",
    f"C:\\{MARK}\\win.ini",
    f"~/{MARK}",
    f"file:///{MARK}",
]


@pytest.fixture
def watched():
    """Every audited file-system event whose arguments mention MARK, while the test runs."""
    seen: list[tuple[str, str]] = []
    state = {"on": True}

    def hook(event, args):
        if state["on"] and MARK in repr(args):
            seen.append((event, repr(args)[:200]))

    sys.addaudithook(hook)  # hooks cannot be removed: this one switches itself off
    yield seen
    state["on"] = False


def test_path_traversal_in_every_parameter(client, watched):
    from urllib.parse import quote

    for t in TRAVERSALS:
        # the run name, in every place it is read
        r = ground(client, run=t)
        assert r.status_code == 404 and error_of(r).startswith("unknown run"), t
        r = ground(client, run=t, html=True)
        assert r.status_code == 404 and error_of(r).startswith("unknown run"), t
        r = client.post("/api/search", json={"run": t, "text": "a dog"})
        assert r.status_code == 404 and error_of(r).startswith("unknown run"), t
        r = client.get("/search", params={"run": t, "text": "a dog"})
        assert r.status_code == 404 and error_of(r).startswith("unknown run"), t
        r = client.get("/", params={"run": t})
        assert r.status_code == 404 and error_of(r).startswith("unknown run"), t
        # the frame route's run, video id and index (quoted, so they reach the route as one segment)
        for url in (
            f"/frames/{quote(t, safe='')}/video0001/0",
            f"/frames/tv/{quote(t, safe='')}/0",
            f"/frames/tv/video0001/{quote(t, safe='')}",
        ):
            r = client.get(url)
            assert r.status_code == 404, (url, r.status_code)
        for url in (f"/frames/tv/{t}/0", f"/style.css/{t}", f"/{t}"):  # raw: never a route
            assert client.get(url).status_code in (400, 404), url
        # the upload's file name and the texts are data, never paths
        r = ground(client, name=t)
        assert r.status_code == 200 and r.json()["results"][0]["box"] == [40.0, 30.0, 120.0, 90.0]
        assert MARK not in r.text
        r = ground(client, text=t[:MAX_TEXT])
        assert r.status_code == 200 and r.json()["results"][0]["text"] == t[:MAX_TEXT].strip()
        r = client.post("/api/search", json={"run": "tv", "text": t[:MAX_TEXT], "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert watched == []  # nothing named in a request was opened or listed
    with pytest.raises(OSError):  # the watch works: opening such a path is seen
        open(f"/{MARK}/x")  # noqa: SIM115
    assert watched and watched[0][0] == "open"
