"""A loopback HTTP file server for OTA bundles, with Range and faults for tests (CPython).

    python tools/fileserver.py ROOT [--port P] [--host H]

Serves the files under ROOT (GET and HEAD, `Range: bytes=A-`, `bytes=A-B`, `bytes=-N`; no
directory listing), one request per connection. A test drives the link's faults from outside
while devices download: stop() cuts every transfer mid-body, restart() comes back on the
same port, stall() holds bodies after the headers, throttle() slows them, cut_after() drops
every connection after N body bytes. `requests` logs every response; `active` and
`concurrent_max` count bodies in flight.
"""
import argparse
import http.server
import os
import re
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse

CHUNK = 65536
SLOW_CHUNK = 512  # throttled bodies go out in small pieces, so a cut can land mid-body


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fileserver"

    def log_message(self, *args):
        pass  # the request log is FileServer.requests

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body):
        fs = self.server.owner
        self.close_connection = True
        path = fs.resolve(self.path)
        entry = {"t": time.time(), "path": self.path, "range": None,
                 "client": self.client_address[1], "status": None, "bytes_sent": 0,
                 "done": False}
        fs.log(entry)
        try:
            if path is None:
                return self._status(entry, 404)
            size = os.path.getsize(path)
            rng = parse_range(self.headers.get("Range"), size)
            if rng == "unsatisfiable":
                self._status(entry, 416, {"Content-Range": "bytes */%d" % size})
                return
            start, end = rng or (0, size - 1)
            entry["range"] = rng
            entry["status"] = 206 if rng else 200
            self.send_response(entry["status"])
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if rng:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            if body and end >= start:
                self._body(fs, entry, path, start, end - start + 1)
        except OSError:
            pass  # the peer went away, or stop()/cut_after() cut the link: nothing to tell
        finally:
            entry["done"] = True

    def _status(self, entry, code, headers=None):
        entry["status"] = code
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def _body(self, fs, entry, path, start, length):
        cut = fs._cut_after
        fs._enter()
        try:
            fs._hold(self.server.dead)
            with open(path, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    if self.server.dead.is_set():
                        return
                    rate = fs._throttle
                    n = min(left, SLOW_CHUNK if rate else CHUNK)
                    if cut is not None:
                        n = min(n, cut - entry["bytes_sent"])
                        if n <= 0:
                            abort(self.connection)
                            return
                    data = f.read(n)
                    if not data:
                        return  # the file shrank under us: a short body, as a cut would be
                    self.wfile.write(data)
                    entry["bytes_sent"] += len(data)
                    left -= len(data)
                    if rate:
                        time.sleep(len(data) / rate)
        finally:
            fs._leave()


def parse_range(header, size):
    """(start, end) inclusive for a single `bytes=` range, None to serve the whole file (no
    header, or one this server does not understand, which RFC 9110 says to ignore), or
    "unsatisfiable"."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size - 1)
    start = int(m.group(1))
    if start >= size:
        return "unsatisfiable"
    end = int(m.group(2)) if m.group(2) else size - 1
    if end < start:
        return None  # invalid, so ignored
    return (start, min(end, size - 1))


def abort(sock, reset=False):
    """Drop a connection mid-body. shutdown() wakes a handler blocked sending on it and
    sends FIN now (the client reads a short body); with reset, its close sends RST, as a
    dead server's peer would see (the client may then lose what it had not read yet)."""
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart() binds the same port while old ones sit in TIME_WAIT

    def __init__(self, addr, owner):
        self.owner = owner
        self.dead = threading.Event()  # set by stop(): wakes stalled handlers
        self.conns = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self):
        # HTTPServer's own looks the host's name up (getfqdn), which can hang on a box
        # without DNS; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FileServer:
    def __init__(self, root, host="127.0.0.1", port=0, tls=None):
        self.root = os.path.realpath(root)
        self.tls = tls  # (certificate file, key file): serve HTTPS
        self.host = host
        self.port = port
        self.requests = []
        self.active = 0
        self.concurrent_max = 0
        self.held = 0  # bodies waiting in stall() right now
        self._cond = threading.Condition()
        self._stall = None
        self._throttle = None
        self._cut_after = None
        self._httpd = None
        self._thread = None

    @property
    def url(self):
        return "%s://%s:%d/" % ("https" if self.tls else "http", self.host, self.port)

    def start(self):
        self._httpd = _Server((self.host, self.port), self)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.dead.set()
        with self._cond:
            self._cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        with httpd.conns_lock:
            conns = list(httpd.conns)
        for c in conns:
            abort(c, reset=True)
        self._thread.join()

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- faults ----

    def stall(self, seconds):
        """Hold every body after its headers for up to SECONDS (each), or until stall(None)."""
        with self._cond:
            self._stall = seconds
            self._cond.notify_all()

    def throttle(self, bytes_per_s):
        self._throttle = bytes_per_s or None

    def cut_after(self, nbytes):
        self._cut_after = nbytes

    # ---- bookkeeping, called by the handlers ----

    def resolve(self, url_path):
        """The file a request path names under root, or None (missing, a directory, or
        outside root, e.g. /../ or a symlink out)."""
        rel = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path)
        path = os.path.realpath(os.path.join(self.root, rel.lstrip("/")))
        if os.path.commonpath([path, self.root]) != self.root or not os.path.isfile(path):
            return None
        return path

    def log(self, entry):
        with self._cond:
            self.requests.append(entry)

    def _enter(self):
        with self._cond:
            self.active += 1
            self.concurrent_max = max(self.concurrent_max, self.active)

    def _leave(self):
        with self._cond:
            self.active -= 1

    def _hold(self, dead):
        with self._cond:
            if self._stall is None:
                return
            since = time.monotonic()
            self.held += 1
            try:
                while self._stall is not None and not dead.is_set():
                    left = since + self._stall - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 1.0))  # stall(math.inf) is allowed
            finally:
                self.held -= 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args(argv)
    # SIGTERM (a test harness, or a shell's background job, which ignores Ctrl-C) stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fs = FileServer(a.root, a.host, a.port).start()
    print("serving %s at %s (Ctrl-C stops)" % (fs.root, fs.url), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
