"""A loopback HTTP file server for OTA bundles, with Range and faults for tests (CPython).

    python testbed/fileserver.py ROOT [--port P] [--host H]

Serves the files under ROOT (GET and HEAD, `Range: bytes=A-`, `bytes=A-B`, `bytes=-N`; no
directory listing), one request per connection. A test drives the link's faults from outside
while devices download: stop() cuts every transfer mid-body, restart() comes back on the
same port, stall() holds bodies after the headers, throttle() slows them, cut_after() drops
every connection after N body bytes, missing_for() answers 404 for a while, lie() answers as a
broken or hostile server would (LIES). `requests` logs every response; `active` and
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
OVERSIZE = 200000  # the body of an "oversized" lie
ENDLESS_MAX = 16 << 20  # an endless header line ends here, or after ENDLESS_S, or at a hang-up
ENDLESS_S = 20
# What lie(mode) makes every GET or HEAD of an existing file answer:
LIES = (
    "wrong-range-start",  # a 206 of a range that starts elsewhere than asked (from 0, or
                          # from 1 when no Range was asked), consistent in itself
    "oversized",  # the right Content-Range, but Content-Length and body OVERSIZE bytes
    "overlong-body",  # honest headers, then the body goes on to OVERSIZE bytes
    "no-content-range",  # a 206 without Content-Range
    "ignore-range",  # a 200 with the whole file, whatever the Range asked
    "bulky-headers",  # valid, but ~3 KB of headers in 29 lines, sent in one write with
                      # the body
    "many-headers",  # 100 short header lines
    "endless-header",  # a header line that never ends (until a bound above)
)


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
                 "done": False, "lie": fs._lie}
        fs.log(entry)
        try:
            if path is None or time.monotonic() < fs._missing_until:
                return self._status(entry, 404)
            size = os.path.getsize(path)
            lie = entry["lie"]
            rng = parse_range(self.headers.get("Range"), size)
            entry["range"] = None if rng == "unsatisfiable" else rng
            if lie == "endless-header":
                return self._endless(entry)
            if rng == "unsatisfiable" and lie is None:
                self._status(entry, 416, {"Content-Range": "bytes */%d" % size})
                return
            if lie == "ignore-range" or rng == "unsatisfiable":
                rng = None
            start, end = rng or (0, size - 1)
            status = 206 if rng else 200
            crange = rng and "bytes %d-%d/%d" % (start, end, size)
            length = sent = end - start + 1
            if lie == "wrong-range-start":
                status, start, end = 206, 0 if start else 1, size - 1
                crange = "bytes %d-%d/%d" % (start, end, size)
                length = sent = end - start + 1
            elif lie == "oversized":
                length = sent = OVERSIZE
            elif lie == "overlong-body":
                sent = OVERSIZE
            elif lie == "no-content-range":
                status, crange = 206, None
            entry["status"] = status
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if crange:
                self.send_header("Content-Range", crange)
            if lie == "bulky-headers":
                for i in range(20):
                    self.send_header("X-Filler-%02d" % i, "%03d" % i * 40)
            elif lie == "many-headers":
                for i in range(100):
                    self.send_header("X-%d" % i, "1")
            self.send_header("Connection", "close")
            if lie == "bulky-headers" and body:
                # Headers and body in one write: the body starts in the client's header read.
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(sent)
                self._end_headers_with(data)
                entry["bytes_sent"] = len(data)
                return
            self.end_headers()
            self.wfile.flush()
            if body and sent > 0:
                self._body(fs, entry, path, start, sent)
        except OSError:
            pass  # the peer went away, or stop()/cut_after() cut the link: nothing to tell
        finally:
            entry["done"] = True

    def _end_headers_with(self, data):
        """end_headers(), and `data` in the same write."""
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + data)
        self._headers_buffer = []

    def _endless(self, entry):
        """A 200 whose one header line never ends: sent until the client hangs up, ENDLESS_MAX
        bytes or ENDLESS_S seconds, whichever comes first."""
        entry["status"] = 200
        self.connection.settimeout(ENDLESS_S)  # a client that stops reading cannot hold us
        until = time.monotonic() + ENDLESS_S
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Endless: ")
        piece = b"a" * 4096
        while (entry["bytes_sent"] < ENDLESS_MAX and time.monotonic() < until
               and not self.server.dead.is_set()):
            self.wfile.write(piece)
            entry["bytes_sent"] += len(piece)

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
                        if not entry["lie"]:
                            return  # the file shrank under us: a short body, as a cut would be
                        data = b"\xa5" * n  # a lie's body past the end of the file
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
        self._lie = None
        self._missing_until = 0.0
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

    def lie(self, mode):
        """Answer every request for an existing file as LIES describes MODE; None: honestly."""
        if mode is not None and mode not in LIES:
            raise ValueError("no such lie: %r (one of %s)" % (mode, ", ".join(LIES)))
        self._lie = mode

    def missing_for(self, seconds):
        """404 for every request until SECONDS from now (a file not uploaded yet)."""
        self._missing_until = time.monotonic() + seconds

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
