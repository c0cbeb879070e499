"""A GCS emulator on 127.0.0.1 for the storage tests: gcp-storage-emulator behind a small proxy of ours.

The proxy does two jobs. It adds the `x-goog-generation` header to object downloads, which the real service sends
and tensorstore (orbax's writer) requires when it rewrites an object, and which the emulator leaves out. And it can
refuse writes: `refuse(substring)` makes every upload whose object name contains `substring` fail with 403, as a
bucket whose permissions or retention policy forbid the write would.
"""
from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port = upstream_port
        self.refused = None  # substring of object names whose uploads are refused
        self.refusals = 0
        self.uploaded_bytes = 0

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # a client closing its connection is no error


def _object_name(path: str, query: dict) -> str:
    if "name" in query:  # uploads name the object in the query
        return query["name"][0]
    parts = path.split("/o/", 1)
    return urllib.parse.unquote(parts[1]) if len(parts) == 2 else ""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, method: str, path: str, body: bytes, headers: dict):
        connection = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handle(self):
        body = self._body()
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        name = _object_name(url.path, query)
        writes = self.command in ("POST", "PUT") and "/upload/" in url.path
        if writes and self.server.refused and self.server.refused in name:
            self.server.refusals += 1
            return self._reply(403, [("Content-Type", "application/json")], json.dumps(
                {"error": {"code": 403, "message": f"refused by the test's fault injection: {name}"}}).encode())
        if writes:
            self.server.uploaded_bytes += len(body)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        status, reply_headers, data = self._forward(self.command, self.path, body, headers)
        if self.command in ("GET", "HEAD") and query.get("alt") == ["media"] and status in (200, 206):
            metadata_path = urllib.parse.urlunsplit(("", "", url.path.replace("/download/", "/"), "", ""))
            meta_status, _, meta = self._forward("GET", metadata_path, b"", {})
            if meta_status == 200:
                record = json.loads(meta)
                reply_headers = [*reply_headers, ("x-goog-generation", str(record.get("generation", "1"))),
                                 ("x-goog-metageneration", str(record.get("metageneration", "1")))]
        self._reply(status, reply_headers, data)

    def _reply(self, status: int, headers, data: bytes):
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on this reply (a cancelled read); nothing to deliver

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle


class GcsServer:
    """The emulator (its own process) and the proxy (a thread here); `url` is what clients are pointed at."""

    def __init__(self, bucket: str):
        self.bucket = bucket
        self._port = free_port()
        emulator = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
        self._process = subprocess.Popen([emulator, "start", "--host=127.0.0.1", f"--port={self._port}", "--in-memory",
                                          f"--default-bucket={bucket}", "--quiet"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self._port), timeout=1).close()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gcp-storage-emulator did not start")
                time.sleep(0.1)
        self.proxy = _Proxy(self._port)
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def env(self) -> dict:
        """What points gcsfs (through epath) and tensorstore (through orbax) at this server."""
        return dict(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url, EPATH_USE_TF="false",
                    # gcsfs's zonal-bucket probe speaks gRPC, which the emulator does not: it would wait 60 s.
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")

    def refuse(self, substring: str | None) -> None:
        self.proxy.refused, self.proxy.refusals = substring, 0

    def close(self) -> None:
        self.proxy.shutdown()
        self._process.terminate()
        self._process.wait(timeout=30)
