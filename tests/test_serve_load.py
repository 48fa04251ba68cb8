"""A bounded load test of `groundkit serve` on loopback: a real uvicorn process on 127.0.0.1 (a free
port), 200 requests from 8 concurrent clients, every answer checked, the server's RSS steady."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import serve_helpers as sh

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

REQUESTS = 200
CLIENTS = 8
WARMUP = 40
TIME_LIMIT_S = 90.0  # the whole loop; on an idle 2-core machine it takes a few seconds
RSS_GROWTH_LIMIT_MIB = 40.0

BOXES = [(40, 30, 120, 90), (10, 10, 60, 140), (100, 20, 190, 70), (0, 0, 90, 90)]
QUERIES = ["a dog is running", "a red car is spinning in the street", "a small bird jumping", "a man sliding on snow"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from groundkit.methods import get_method

    torch.set_num_threads(1)
    _, crosskd = sh.crosskd_run(tmp_path_factory.getbasetemp())
    salient = sh.make_salient_run(tmp_path_factory.mktemp("serve_load") / "salient")
    expected_search = {q: get_method("crosskd").predictor(crosskd).search(q, k=5) for q in QUERIES}
    with sh.serve_process(["--run", str(salient), "--run", f"tv={crosskd}", "--max-upload-mb", "1"]) as (url, proc):
        yield url, proc, expected_search


def _request(client, i: int, expected_search) -> str | None:
    """Request number ``i`` of the mix; None when the answer is right, else what is wrong."""
    kind = i % 8
    if kind in (0, 1, 2, 3):  # image grounding, four images with known boxes
        box = BOXES[i % len(BOXES)]
        img = sh.png_bytes(sh.square_image(200, 150, box))
        r = client.post(
            "/api/ground",
            data={"run": "salient", "text": f"object {i}"},
            files={"image": (f"{i}.png", img, "image/png")},
        )
        if r.status_code != 200:
            return f"ground {i}: {r.status_code} {r.text[:200]}"
        res = r.json()["results"]
        ok = res[0]["box"] == [float(v) for v in box] and res[0]["text"] == f"object {i}"
        return None if ok else f"ground {i}: {res}"
    if kind in (4, 5):  # video search, compared with the same run's Retriever in this process
        q = QUERIES[i % len(QUERIES)]
        r = client.post("/api/search", json={"run": "tv", "text": q, "k": 5})
        if r.status_code != 200:
            return f"search {i}: {r.status_code} {r.text[:200]}"
        got = [(h["video_id"], h["score"]) for h in r.json()["results"]]
        want = expected_search[q]
        ok = [v for v, _ in got] == [v for v, _ in want] and all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(got, want))
        return None if ok else f"search {i}: {got} != {want}"
    if kind == 6:  # the HTML page
        r = client.get("/", params={"run": "tv"})
        ok = r.status_code == 200 and 'id="search-form"' in r.text
        return None if ok else f"page {i}: {r.status_code}"
    # a bad upload, refused the same way every time
    r = client.post(
        "/api/ground",
        data={"run": "salient", "text": "x"},
        files={"image": ("x.jpg", b"not an image" * 50, "image/jpeg")},
    )
    ok = r.status_code == 415 and r.json()["error"].startswith("the file is not an image")
    return None if ok else f"bad {i}: {r.status_code} {r.text[:200]}"


def _run(url: str, indices: list[int], expected_search, deadline: float) -> list[str]:
    errors: list[str] = []

    def worker(part: list[int]) -> list[str]:
        out = []
        with httpx.Client(base_url=url, timeout=30.0) as client:
            for i in part:
                if time.monotonic() > deadline:
                    out.append(f"request {i}: not sent, out of time")
                    continue
                try:
                    err = _request(client, i, expected_search)
                except httpx.HTTPError as e:
                    err = f"request {i}: {type(e).__name__}: {e}"
                if err:
                    out.append(err)
        return out

    parts = [indices[c::CLIENTS] for c in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        for errs in pool.map(worker, parts):
            errors.extend(errs)
    return errors


def test_200_requests_from_8_clients_all_right_and_memory_steady(server, tmp_path):
    url, proc, expected_search = server
    start = time.monotonic()
    deadline = start + TIME_LIMIT_S
    assert _run(url, list(range(WARMUP)), expected_search, deadline) == []  # warm-up: caches, allocator pools
    rss_before = sh.rss_kib(proc.pid)
    t0 = time.monotonic()
    errors = _run(url, list(range(REQUESTS)), expected_search, deadline)
    elapsed = time.monotonic() - t0
    rss_after = sh.rss_kib(proc.pid)
    figures = {
        "requests": REQUESTS,
        "clients": CLIENTS,
        "seconds": round(elapsed, 2),
        "requests_per_second": round(REQUESTS / elapsed, 1),
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
    }
    (tmp_path / "load_figures.json").write_text(json.dumps(figures, indent=1))
    print("\nserve load test:", json.dumps(figures))
    assert errors == [], errors[:5]
    assert elapsed < TIME_LIMIT_S
    assert (rss_after - rss_before) / 1024 < RSS_GROWTH_LIMIT_MIB, figures
    assert proc.poll() is None and httpx.get(url + "/healthz").json()["status"] == "ok"


def test_streamed_oversized_body_is_413(server):
    """A chunked upload (no Content-Length) is cut off at the limit while it streams in."""
    url, proc, _ = server
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    boundary = "gkboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="run"\r\n\r\nsalient\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nx\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB of a 1 MB limit
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    conn.request(
        "POST",
        "/api/ground",
        body=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        encode_chunked=True,
    )
    r = conn.getresponse()
    assert r.status == 413
    assert (
        json.loads(r.read())["error"] == "the request is larger than 1.1 MB (the upload limit plus the form around it)"
    )
    conn.close()
    # a declared Content-Length over the limit is refused too, and the server goes on
    big = httpx.post(
        url + "/api/ground",
        data={"run": "salient", "text": "x"},
        files={"image": ("b.png", bytes(2 * 1024 * 1024), "image/png")},
    )
    assert big.status_code == 413
    assert proc.poll() is None and httpx.get(url + "/api/runs").status_code == 200


def test_ctrl_c_stops_the_server_in_one_line(tmp_path):
    import signal  # noqa: PLC0415

    salient = sh.make_salient_run(tmp_path / "salient")
    with sh.serve_process(["--run", str(salient)]) as (url, proc):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.2)  # the reader thread drains the last lines
        log = "".join(proc.log)
    assert "Traceback" not in log and "continue with" not in log, log
    assert log.strip().splitlines()[-1] == "groundkit serve: stopped", log
