# HTTP(S) GET of a file from a byte offset on, streamed in chunks into a caller's function,
# for over-the-air updates: a body never sits in RAM whole, and a dropped connection is
# resumed with a Range request from the bytes already written.
import asyncio


class Transient(OSError):
    """What a later attempt may cure: the link, the server restarting, a 5xx."""


def split_url(url):
    """(tls, host, port, path) of an http:// or https:// URL."""
    tls = url.startswith("https://")
    rest = url[8:] if tls else url[7:]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return tls, host, int(port) if port else (443 if tls else 80), "/" + path


async def _line(r, timeout):
    line = await asyncio.wait_for(r.readline(), timeout)
    if not line:
        raise Transient("connection closed in the headers")
    if len(line) > 512:
        raise ValueError("HTTP header line longer than 512 bytes")
    return line


async def get(url, start, sink, buf, ssl=None, timeout=10, limit=None):
    """GET `url` from byte `start`: sink(memoryview) for each chunk read into `buf`.
    Returns the size of the whole file on the server. Raises Transient for what a retry may
    cure, ValueError for what it cannot (a 4xx, a body longer than `limit`)."""
    tls, host, port, path = split_url(url)
    if tls and ssl is None:
        raise ValueError("an https URL needs the broker's TLS settings (broker.tls)")
    try:
        r, _ = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl if tls else None, server_hostname=host if tls else None),
            timeout)
    except OSError as e:
        raise Transient("connect to %s:%d: %r" % (host, port, e))
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
        status = await _line(r, timeout)
        parts = status.split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        length = total = None
        while True:
            h = await _line(r, timeout)
            if h in (b"\r\n", b"\n"):
                break
            k, _, v = h.partition(b":")
            k = k.strip().lower()
            v = v.strip()
            if k == b"content-length":
                length = int(v)
            elif k == b"content-range":
                # bytes a-b/total, or bytes */total with a 416
                total = int(v.rpartition(b"/")[2])
        if code == 416:
            return total if total is not None else start  # nothing from `start` on
        if code >= 500 or code == 0:
            raise Transient("HTTP %d for %s" % (code, path))
        if code not in (200, 206):
            raise ValueError("HTTP %d for %s" % (code, path))
        if length is None:
            raise ValueError("no Content-Length for %s" % path)
        skip = start if code == 200 else 0  # the server sent the whole file: ours is a prefix
        if code == 200:
            total = length
        if limit is not None and total - start > limit:
            raise ValueError("%s is %d bytes on the server, more than expected" % (path, total))
        got = 0
        mv = memoryview(buf)
        while got < length:
            n = await asyncio.wait_for(r.readinto(mv[:min(len(buf), length - got)]), timeout)
            if n is None:
                continue
            if not n:
                raise Transient("connection closed after %d of %d bytes" % (got, length))
            got += n
            if skip >= n:
                skip -= n
                continue
            try:
                sink(mv[skip:n])
            except OSError as e:
                # The flash, not the link: a retry would write to it again, forever.
                raise ValueError("writing the download failed: %r" % (e,))
            skip = 0
        return total
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
