# HTTP(S) GET of a file from a byte offset on, streamed in chunks into a caller's function,
# for over-the-air updates: a body never sits in RAM whole, and a dropped connection is
# resumed with a Range request from the bytes already written. The server is not trusted
# with the board: the status line and headers are read through the caller's buffer with
# fixed bounds, a reply must be exactly the range asked for, and no more than `limit` bytes
# ever reach the sink (the flash).
import asyncio

LINE = 512  # the longest status or header line taken (the buffer must be larger)
HEAD = 4096  # all of them together
LINES = 64  # a CDN adds a dozen headers of its own; the bytes are what HEAD bounds


class Transient(OSError):
    """What a later attempt may cure: the link, the server restarting or misconfigured, a 4xx
    or 5xx, a certificate that does not verify. The caller retries with backoff."""


class BadReply(Transient):
    """The server answered something it should not have (malformed, the wrong range, too
    long): nothing of it reached the sink. Retried too, and counted apart."""


class FlashError(Exception):
    """The sink failed (the flash, not the link): not an OSError, so that nobody retries it
    as a link error."""


def split_url(url):
    """(tls, host, port, path) of an http:// or https:// URL."""
    tls = url.startswith("https://")
    rest = url[8:] if tls else url[7:]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return tls, host, int(port) if port else (443 if tls else 80), "/" + path


def _num(v):
    # Digits only (int() would take a sign or a bigint): at most 9, a small int on a 32-bit
    # board, no allocation and no OverflowError.
    if not v.isdigit() or len(v) > 9:
        raise BadReply("not a number in the reply: %r" % v[:20])
    return int(v)


def _range(v):
    """(first, last, total) of a Content-Range `bytes first-last/total`; first and last None
    for `bytes */total` (a 416's)."""
    unit, _, v = v.partition(b" ")
    if unit.lower() != b"bytes":
        raise BadReply("Content-Range in %r" % unit[:20])
    v, _, t = v.partition(b"/")
    if v == b"*":
        return None, None, _num(t)
    a, _, b = v.partition(b"-")
    return _num(a), _num(b), _num(t)


async def _read(r, mv):
    """Bytes read into mv, 0 when the peer closed."""
    while True:
        try:
            n = await r.readinto(mv)
        except ValueError as e:  # the TLS layer's way to fail (e.g. a certificate)
            raise Transient("TLS: %s" % str(e).strip())
        if n is not None:  # None: a TLS record not complete yet
            return n


async def _head(r, buf, mv):
    """The status line and headers, read into buf and parsed there (never a line longer than
    LINE, never more than HEAD bytes or LINES lines): (code, Content-Length, Content-Range,
    a, b) with mv[a:b] the body's first bytes, which came with the headers."""
    code = length = rng = None
    a = b = seen = lines = 0  # mv[a:b]: read, not parsed yet
    while True:
        nl = buf.find(b"\n", a, b)
        if nl < 0:
            if b - a > LINE:
                raise BadReply("a header line longer than %d bytes" % LINE)
            mv[: b - a] = mv[a:b]  # the start of a line to the front, then read on
            b -= a
            a = 0
            n = await _read(r, mv[b:])
            if not n:
                raise Transient("connection closed in the headers")
            b += n
            continue
        seen += nl + 1 - a
        lines += 1
        if nl - a > LINE or seen > HEAD or lines > LINES:
            raise BadReply("headers longer than %d bytes or %d lines" % (HEAD, LINES))
        line = bytes(mv[a:nl]).rstrip(b"\r")  # at most LINE bytes
        a = nl + 1
        if code is None:
            p = line.split(None, 2)
            if len(p) < 2 or not p[0].startswith(b"HTTP/") or len(p[1]) != 3:
                raise BadReply("not an HTTP status line: %r" % line[:40])
            code = _num(p[1])
        elif not line:
            return code, length, rng, a, b
        else:
            k, colon, v = line.partition(b":")
            if not colon:
                raise BadReply("not a header line: %r" % line[:40])
            k = k.strip().lower()
            if k == b"content-length":
                n = _num(v.strip())
                if length is not None and n != length:
                    raise BadReply("two different Content-Lengths")
                length = n
            elif k == b"content-range":
                rng = v.strip()


async def get(url, start, sink, buf, ssl=None, timeout=10, limit=None):
    """GET `url` from byte `start`: sink(memoryview) for each chunk read into `buf` (1 KB or
    more), at most `limit` bytes in all. Returns the size of the whole file on the server.
    Raises Transient (BadReply when the server misbehaved) for anything about the server or
    the link, FlashError when the sink raises OSError; ValueError only for an https URL
    without TLS settings or a malformed URL (the caller's, not the server's)."""
    tls, host, port, path = split_url(url)
    if tls and ssl is None:
        raise ValueError("an https URL needs the broker's TLS settings (broker.tls)")
    try:
        r, _ = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl if tls else None, server_hostname=host if tls else None),
            timeout)
    except OSError as e:
        raise Transient("connect to %s:%d: %r" % (host, port, e))
    mv = memoryview(buf)
    try:
        req = "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n" % (path, host)
        if start:
            req += "Range: bytes=%d-\r\n" % start
        r.write((req + "\r\n").encode())
        try:
            await asyncio.wait_for(r.drain(), timeout)  # with TLS, the handshake runs here
        except ValueError as e:
            # A certificate that does not verify: retried, as the broker's is, never taken.
            raise Transient("TLS with %s: %s" % (host, str(e).strip()))
        # One deadline for all the headers: a server dripping them cannot hold the task.
        code, length, rng, a, b = await asyncio.wait_for(_head(r, buf, mv), timeout)
        first = last = total = None
        if rng is not None:
            first, last, total = _range(rng)
        if code == 416:
            # Nothing from `start` on: the file is no longer than what the caller has.
            if total is None:
                return start
            if first is not None or total > start:
                raise BadReply("416 for %s, which has %d bytes" % (path, total))
            return total
        if code not in (200, 206):
            raise Transient("HTTP %d for %s" % (code, path))
        if length is None:
            raise BadReply("no Content-Length for %s" % path)
        skip = 0
        if code == 200:
            # The server ignored Range and sends the whole file: ours is a prefix of it.
            total, skip = length, start
            if total <= start:
                return total  # nothing past what the caller has: not read
        elif total is None or first != start or last != total - 1 or length != total - start:
            # Appended at `start`, any other range would corrupt the file.
            raise BadReply("206 for %s from %d: Content-Range %r, Content-Length %d"
                           % (path, start, rng, length))
        if limit is not None and total - start > limit:
            raise BadReply("%s is %d bytes on the server, more than expected" % (path, total))
        left = length
        n = min(b - a, left)
        while True:
            left -= n
            if n > skip:
                try:
                    sink(mv[a + skip:a + n])
                except OSError as e:
                    raise FlashError("writing the download failed: %r" % (e,))
                skip = 0
            else:
                skip -= n
            if not left:
                return total
            a = 0
            n = await asyncio.wait_for(_read(r, mv[:min(len(mv), left)]), timeout)
            if not n:
                raise Transient("connection closed after %d of %d bytes"
                                % (length - left, length))
    except (OSError, EOFError) as e:
        if isinstance(e, Transient):
            raise
        raise Transient("%s: %r" % (path, e))
    except asyncio.TimeoutError:
        raise Transient("%s: no data for %d s" % (path, timeout))
    finally:
        try:
            r.close()
            await r.wait_closed()
        except Exception:  # noqa: BLE001
            pass
