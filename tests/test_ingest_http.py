"""Ingest from URL lists against an HTTP server on 127.0.0.1 started by the test.

Routes cover 200, 404, a server that never answers in time, one that answers slowly
(but in time), ones that trickle the body or the headers past the deadline, a flaky
503, redirects, non-image bodies and broken HTTP (a garbage status line, bodies cut
short). Every URL ends as a row or a reject carrying its status.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.image_io import Rejected, check_url, fetch_url
from tasks.ingest import IngestConfig, detect_source, ingest_dataset
from test_ingest_images import stage_options


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}  # requests per path
    lock = threading.Lock()

    def log_message(self, *args):  # keep test output clean
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/png") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.lock:
            self.calls[self.path] = self.calls.get(self.path, 0) + 1
        try:
            self.route(self.path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts): expected here

    def route(self, path: str) -> None:
        if path.startswith("/img/"):
            self.send(200, png(int(path.split("/")[-1].split(".")[0])))
        elif path == "/missing.png":
            self.send(404, b"not found", "text/plain")
        elif path == "/hang.png":
            time.sleep(2.5)  # far beyond the client's timeout
            self.send(200, png(90))
        elif path.startswith("/slow/"):
            time.sleep(0.3)  # slow, but within the timeout
            self.send(200, png(int(path.split("/")[-1].split(".")[0])))
        elif path == "/trickle.png":
            body = png(91)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 200):  # each gap is short; the whole is too slow
                self.wfile.write(body[i : i + 200])
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/trickle-headers.png":
            # One header byte every 0.1 s: each read is quick, the whole far past the deadline.
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 40 + b"\r\nContent-Length: 0\r\n\r\n":
                self.wfile.write(bytes([byte]))
                time.sleep(0.1)
        elif path == "/garbage.png":
            self.wfile.write(b"HELLO THERE\r\n\r\n")
        elif path == "/cut-body.png":
            body = png(94)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
        elif path == "/cut-chunked.png":
            body = png(95)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
        elif path == "/flaky.png":
            if self.calls[path] == 1:
                self.send(503, b"busy", "text/plain")
            else:
                self.send(200, png(92))
        elif path == "/text.png":
            self.send(200, b"<html>an error page</html>", "text/html")
        elif path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/img/93.png")
            self.end_headers()
        elif path == "/redirect-to-file.png":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/redirect-malformed.png":
            self.send_response(302)
            self.send_header("Location", "http://[::1/x.png")
            self.end_headers()
        else:
            self.send(500, b"unexpected route", "text/plain")


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    Handler.calls = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


CONFIG = IngestConfig(workers=1, val_fraction=0.0, http_timeout_s=0.8, http_retries=1, http_backoff_s=0.05)


def test_url_list_every_status_is_counted(server: str, tmp_path: Path):
    expected = {
        f"{server}/img/1.png": None,
        f"{server}/img/2.png": None,
        f"{server}/slow/3.png": None,
        f"{server}/flaky.png": None,  # 503 once, then 200: the retry saves it
        f"{server}/redirect.png": None,
        f"{server}/missing.png": "http_error",
        f"{server}/hang.png": "timeout",
        f"{server}/trickle.png": "timeout",
        f"{server}/text.png": "undecodable",
        f"{server}/redirect-to-file.png": "http_error",
        "http://127.0.0.1:1/closed-port.png": "download_failed",
        "file:///etc/passwd": "bad_url",
        "ftp://example.com/a.png": "bad_url",
        "http://[::1/x.png": "bad_url",
        "http://example.com:port/x.png": "bad_url",
        f"{server}/cut-body.png": "download_failed",
    }
    lines = ["url,caption"] + [f"{url},caption for {i}" for i, url in enumerate(expected)]
    (tmp_path / "urls.csv").write_text("\n".join(lines) + "\n")
    assert detect_source(tmp_path / "urls.csv").kind == "urls"

    started = time.monotonic()
    dv = ingest_dataset(tmp_path / "urls.csv", "web", CONFIG, progress=False)
    assert time.monotonic() - started < 15

    assert dv.counts["train"] + dv.counts["rejects"] == len(expected)
    rejects = {r["source_uri"]: r for r in pq.read_table(Path(dv.root) / "rejects.parquet").to_pylist()}
    assert {u: r["reason"] for u, r in rejects.items()} == {u: r for u, r in expected.items() if r}
    assert "HTTP 404" in rejects[f"{server}/missing.png"]["detail"]
    assert "2 attempts" in rejects[f"{server}/hang.png"]["detail"]
    assert rejects["file:///etc/passwd"]["caption"] == "caption for 11"
    accepted = pq.read_table(Path(dv.root) / "train").to_pylist()
    assert sorted(r["source_uri"] for r in accepted) == sorted(u for u, r in expected.items() if r is None)
    assert all(Image.open(io.BytesIO(r["image"])).size == (32, 32) for r in accepted)


def test_parquet_url_list_with_laion_column_names_downloads_concurrently(server: str, tmp_path: Path):
    urls = [f"{server}/slow/{i}.png" for i in range(8)]
    table = pa.table({"URL": urls, "TEXT": [f"slow image {i}" for i in range(8)], "similarity": [0.3] * 8})
    pq.write_table(table, tmp_path / "laion.parquet")
    config = CONFIG.model_copy(update={"http_concurrency": 8})
    started = time.monotonic()
    dv = ingest_dataset(tmp_path / "laion.parquet", "laion", config, progress=False)
    elapsed = time.monotonic() - started
    assert dv.counts == {"train": 8, "val": 0, "rejects": 0}
    assert elapsed < 8 * 0.3  # eight 0.3 s answers, fetched at once


def test_url_list_without_required_columns_is_a_clear_error(tmp_path: Path):
    (tmp_path / "urls.csv").write_text("link,caption\nhttp://x/a.png,a\n")
    from tasks.ingest import IngestError

    with pytest.raises(IngestError, match="needs a url and a caption"):
        ingest_dataset(tmp_path / "urls.csv", "bad", CONFIG, progress=False)


@pytest.mark.parametrize(
    "url",
    ["http://[::1/x.png", "http://example.com:port/x.png", "http://example.com:99999/x.png", "http:///x.png", ""],
    ids=["open-bracket", "named-port", "port-out-of-range", "no-host", "empty"],
)
def test_malformed_url_is_a_bad_url(url: str):
    reason, detail = check_url(url)
    assert reason == "bad_url" and detail


def test_well_formed_urls_pass_the_check():
    assert check_url("http://[::1]:8080/x.png") is None
    assert check_url("HTTPS://example.com/a%20b.png?size=2") is None


def test_redirect_to_a_malformed_url_is_a_bad_url_not_retried(server: str):
    with pytest.raises(Rejected) as info:
        fetch_url(f"{server}/redirect-malformed.png", stage_options(http_timeout_s=0.5, http_retries=1))  # a retry allowed, not used
    assert info.value.reason == "bad_url"
    assert Handler.calls["/redirect-malformed.png"] == 1


@pytest.mark.parametrize("path", ["/garbage.png", "/cut-body.png", "/cut-chunked.png"])
def test_broken_http_answer_is_a_download_failure_after_retries(server: str, path: str):
    with pytest.raises(Rejected) as info:
        fetch_url(f"{server}{path}", stage_options(http_timeout_s=0.5, http_retries=1))
    assert info.value.reason == "download_failed"
    assert "2 attempts" in info.value.detail
    assert Handler.calls[path] == 2


def test_deadline_covers_the_headers(server: str):
    started = time.monotonic()
    with pytest.raises(Rejected) as info:
        fetch_url(f"{server}/trickle-headers.png", stage_options(http_timeout_s=0.5, http_retries=0))
    assert info.value.reason == "timeout"
    assert time.monotonic() - started < 1.0  # the trickle alone takes 9 s
