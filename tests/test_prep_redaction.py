"""Prep never records a URL's query string or credentials: not in manifest.json, the log
or an error message. Sources are a memory:// URL with a query and a presigned-style HTTP
URL served here (403 without the right `sig`)."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse

import pytest

from data_prep import run_prep
from data_prep.config import PrepConfig
from data_prep.errors import PrepError

SECRET = "SECRET0123"
TEXT = b"the king of the north went to the city\nthe church by the river was old\n"


def cfg(out, sources, **kw) -> PrepConfig:
    return PrepConfig(sources=sources, output_dir=str(out), seq_len=32, min_tokens=1,
                      workers=0, validation_fraction=0.5, **kw)


def assert_no_secret(out, caplog) -> dict:
    text = (out / "manifest.json").read_text()
    assert SECRET not in text and SECRET not in caplog.text
    return json.loads(text)


def test_memory_url_with_a_query_string(tmp_path, tokenizer_dir, caplog):
    import fsspec

    url = f"memory://corpus/a.txt?X-Amz-Signature={SECRET}&X-Amz-Expires=60"
    fsspec.filesystem("memory").pipe(url, TEXT)
    fsspec.filesystem("memory").pipe(f"memory://h.txt?sig={SECRET}", b"# nothing held out\n")
    manifest = run_prep(cfg(tmp_path / "out", [url], holdout=f"memory://h.txt?sig={SECRET}"),
                        str(tokenizer_dir))
    assert manifest["documents"]["kept"] == 2
    recorded = assert_no_secret(tmp_path / "out", caplog)
    assert recorded["sources"][0]["source"] == "memory://corpus/a.txt"
    assert recorded["sources"][0]["files"][0]["path"] == "memory:///corpus/a.txt"  # fsspec
    assert recorded["config"]["sources"] == ["memory://corpus/a.txt"]
    assert recorded["config"]["holdout"] == "memory://h.txt"


class SignedFiles(http.server.BaseHTTPRequestHandler):
    """Serves TEXT at /a.txt to requests signed `?sig=SECRET`, with Range support (fsspec
    reads HTTP files in ranges); 403 for anything else, like an expired presigned URL."""

    def log_message(self, *args):
        pass

    def _answer(self) -> bytes:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/a.txt" or url.query != f"sig={SECRET}":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return b""
        body, status = TEXT, 200
        if rng := self.headers.get("Range"):
            first, last = rng.split("=")[1].split("-")
            last = min(int(last) if last else len(TEXT) - 1, len(TEXT) - 1)
            body, status = TEXT[int(first):last + 1], 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(TEXT)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def do_HEAD(self):
        self._answer()

    def do_GET(self):
        self.wfile.write(self._answer())


@pytest.fixture
def signed_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SignedFiles)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_presigned_http_url(tmp_path, tokenizer_dir, signed_server, caplog):
    url = f"{signed_server}/a.txt?sig={SECRET}"
    manifest = run_prep(cfg(tmp_path / "out", [url]), str(tokenizer_dir))
    assert manifest["documents"]["kept"] == 2
    recorded = assert_no_secret(tmp_path / "out", caplog)
    assert recorded["sources"][0]["files"][0]["path"] == f"{signed_server}/a.txt"


def test_an_expired_presigned_url_is_an_error_without_the_signature(tmp_path, tokenizer_dir,
                                                                     signed_server):
    with pytest.raises(PrepError) as err:
        run_prep(cfg(tmp_path / "out", [f"{signed_server}/a.txt?sig=OLD{SECRET}"]),
                 str(tokenizer_dir))
    assert f"{signed_server}/a.txt" in str(err.value) and SECRET not in str(err.value)
