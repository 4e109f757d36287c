"""A mirror serving more bytes than a dataset file can have is stopped at the bound
(issue 12), over HTTP on 127.0.0.1."""

import dataclasses
import http.server
import threading

import pytest

from data_fixtures import files_under
from layerhessians.data import MIRROR_ENV, REGISTRY, load_dataset
from layerhessians.errors import DatasetMissingError

LIMIT = 64 * 1024
SERVED_MAX = 64 << 20  # what the server would send if never stopped


class _Flood(http.server.BaseHTTPRequestHandler):
    """Streams zeros: without Content-Length (read until closed), or announcing it."""

    sent = []
    announce = False

    def do_GET(self):
        self.send_response(200)
        if self.announce:
            self.send_header("Content-Length", str(SERVED_MAX))
        self.end_headers()
        chunk, total = b"\0" * (1 << 16), 0
        try:
            while total < SERVED_MAX:
                self.wfile.write(chunk)
                total += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.sent.append(total)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("announce", [False, True])
def test_oversized_download_stops_at_the_bound(tmp_path, monkeypatch, announce):
    handler = type("Flood", (_Flood,), {"sent": [], "announce": announce})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
        spec = REGISTRY["MNIST"]
        downloads = tuple(dataclasses.replace(r, max_bytes=LIMIT) for r in spec.downloads)
        monkeypatch.setitem(REGISTRY, "MNIST", dataclasses.replace(spec, downloads=downloads))
        with pytest.raises(DatasetMissingError, match="more than the expected at most 65536") \
                as err:
            load_dataset("MNIST", root=tmp_path / "datasets", download=True)
        assert "\n" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert handler.sent and max(handler.sent) < SERVED_MAX  # the client hung up early
    assert not [p for p in files_under(tmp_path) if p.endswith(".part")]


def test_registry_bounds_every_file():
    for spec in REGISTRY.values():
        for remote in spec.downloads:
            assert 0 < remote.max_bytes <= 512 << 20


class _Redirect(http.server.BaseHTTPRequestHandler):
    """Redirects every request to an ftp:// URL (issue 22 item 9)."""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "ftp://127.0.0.1:1/train-images-idx3-ubyte.gz")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_mirror_redirect_to_ftp_is_not_followed(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(DatasetMissingError, match="not an http.s. URL; not followed") as err:
            load_dataset("MNIST", root=tmp_path / "datasets", download=True)
        assert "\n" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert not files_under(tmp_path)
