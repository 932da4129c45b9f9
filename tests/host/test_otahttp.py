"""firmware/otahttp.get against a lying or broken file server (testbed/fileserver.py's lie()):
the real code in the real Unix port (tests/mpy/otahttp_get.py), on a small heap. Whatever the
server sends, the sink (the flash) gets at most `limit` bytes and only those asked for, and
what comes out is Transient (BadReply when the server misbehaved) or, when the sink fails,
FlashError; never another exception."""
import json
import os
import subprocess
import time

import pytest

from testbed.devices import ROOT, micropython_path
from testbed.fileserver import FileServer

SCRIPT = os.path.join(ROOT, "tests", "mpy", "otahttp_get.py")
HEAP = "64k"  # a board's heap is ~100 KB; the old unbounded readline died in this one
SIZE = 10000
START = 3333  # a resumed download, not on a buffer boundary


@pytest.fixture
def srv(tmp_path):
    os.makedirs(tmp_path / "srv")
    (tmp_path / "srv" / "f.bin").write_bytes(os.urandom(SIZE))
    s = FileServer(str(tmp_path / "srv")).start()
    yield s
    s.stop()


@pytest.fixture
def data(tmp_path, srv):
    return (tmp_path / "srv" / "f.bin").read_bytes()


@pytest.fixture
def get(tmp_path, srv):
    """get(start, limit, **more) -> (result dict, the bytes the sink was given)."""
    n = [0]

    def run(start=0, limit=None, path="f.bin", **more):
        n[0] += 1
        out = tmp_path / ("sink%d" % n[0])
        args = dict(url=srv.url + path, start=start, limit=limit, out=str(out), **more)
        p = subprocess.run([micropython_path(), "-X", "heapsize=" + HEAP, SCRIPT,
                            json.dumps(args)], capture_output=True, text=True, timeout=60)
        lines = [l for l in p.stdout.splitlines() if l.startswith("@@R ")]
        assert p.returncode == 0 and lines, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
        return json.loads(lines[-1][4:]), out.read_bytes()

    return run


def wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def test_a_whole_file_arrives_byte_for_byte(get, srv, data):
    r, got = get(0, SIZE)
    assert r["exc"] is None and r["total"] == SIZE, r
    assert got == data
    assert r["biggest"] <= 1024, r  # streamed through the 1 KB buffer
    assert srv.requests[-1]["status"] == 200 and srv.requests[-1]["range"] is None


def test_a_resumed_download_gets_the_rest_byte_for_byte(get, srv, data):
    r, got = get(START, SIZE - START)
    assert r["exc"] is None and r["total"] == SIZE, r
    assert got == data[START:]
    assert srv.requests[-1]["status"] == 206
    assert srv.requests[-1]["range"] == (START, SIZE - 1)


def test_a_download_with_nothing_left_gets_nothing(get, srv, data):
    r, got = get(SIZE, 0)
    assert r["exc"] is None and r["total"] == SIZE and got == b"", r
    assert srv.requests[-1]["status"] == 416


@pytest.mark.parametrize("start", [0, START])
def test_a_server_that_ignores_range_is_skipped_to_start(get, srv, data, start):
    srv.lie("ignore-range")
    r, got = get(start, SIZE - start)
    assert r["exc"] is None and r["total"] == SIZE, r
    assert got == data[start:]
    assert srv.requests[-1]["status"] == 200 and srv.requests[-1]["bytes_sent"] == SIZE


@pytest.mark.parametrize("start", [0, START])
def test_body_bytes_that_come_with_the_headers_are_kept_once(get, srv, data, start):
    # ~3 KB of headers in the same write as the body: lines cross the 1 KB reads, and the
    # read that holds the blank line holds the body's first bytes too.
    srv.lie("bulky-headers")
    r, got = get(start, SIZE - start)
    assert r["exc"] is None and r["total"] == SIZE, r
    assert got == data[start:]


@pytest.mark.parametrize("start", [0, START])
def test_a_body_longer_than_its_content_length_is_cut_there(get, srv, data, start):
    srv.lie("overlong-body")
    r, got = get(start, SIZE - start)
    assert r["exc"] is None and r["total"] == SIZE, r
    assert got == data[start:]
    wait(lambda: srv.requests[-1]["done"], 30, "the server's handler to end")
    assert srv.requests[-1]["lie"] == "overlong-body"


@pytest.mark.parametrize("lie,start", [
    ("wrong-range-start", START),  # from 0 instead: appended, the file would be corrupt
    ("wrong-range-start", 0),  # a 206 from 1 where none was asked
    ("oversized", START),  # the right Content-Range, Content-Length 200,000
    ("oversized", 0),  # a 200 of 200,000 bytes for a file of 10,000
    ("no-content-range", START),  # once a TypeError that killed the task
    ("no-content-range", 0),
    ("many-headers", 0),
    ("endless-header", 0),  # once a MemoryError in this heap
])
def test_a_lying_server_is_refused_before_anything_reaches_the_flash(get, srv, lie, start):
    srv.lie(lie)
    r, got = get(start, SIZE - start)
    assert r["exc"] == "BadReply" and r["transient"] and r["oserror"], r
    assert got == b"" and r["sunk"] == 0, r
    req = srv.requests[-1]
    assert req["lie"] == lie
    wait(lambda: req["done"], 30, "the server's handler to end")
    if lie == "endless-header":
        # It kept sending after the client stopped reading (at a line of 512 bytes), and
        # still ended by itself. How much went out before the hang-up reached the server
        # depends on the host's scheduling: one 4 KiB write on a busy machine, more on an
        # idle one.
        assert req["bytes_sent"] > 512, req


def test_a_file_longer_than_the_limit_is_refused_before_its_body(get, srv):
    # An honest server, a file of 10,000 bytes where the caller expects 10 (the finding: all
    # 200,000 reached the sink).
    for start in (0, START):
        r, got = get(start, 10)
        assert r["exc"] == "BadReply" and got == b"", r


def test_a_missing_file_is_transient_not_a_bad_reply(get, srv):
    r, got = get(0, SIZE, path="nothere.bin")
    assert r["exc"] == "Transient" and "HTTP 404" in r["msg"] and got == b"", r
    srv.missing_for(3600)
    r, got = get(START, SIZE - START)
    assert r["exc"] == "Transient" and "HTTP 404" in r["msg"] and got == b"", r


def test_a_file_missing_for_a_while_arrives_when_retried(get, srv, data):
    srv.missing_for(1.0)
    r, got = get(START, SIZE - START, retry_s=30)
    assert r["exc"] is None and got == data[START:], r
    assert r["failures"] and all("HTTP 404" in f for f in r["failures"]), r
    assert [q["status"] for q in srv.requests][-1] == 206
    assert {q["status"] for q in srv.requests[:-1]} == {404}


def test_a_sink_that_fails_is_a_flash_error_not_a_link_error(get, srv, data):
    r, got = get(0, SIZE, fail_after=2048)
    assert r["exc"] == "FlashError" and not r["oserror"] and "ENOSPC" in r["msg"], r
    # Stopped at the first chunk after the flash filled (chunks are what each read gave).
    assert 2048 <= r["sunk"] < 2048 + 1024 and got == data[:r["sunk"]], r


def test_a_dead_server_is_transient(get, srv):
    srv.stop()
    r, got = get(0, SIZE)
    # Refused at connect (or, a non-blocking connect, at the first write).
    assert r["exc"] == "Transient" and "111" in r["msg"], r


def test_a_server_whose_body_stops_is_transient_and_keeps_what_came(get, srv, data):
    srv.cut_after(4000)
    r, got = get(START, SIZE - START)
    assert r["exc"] == "Transient" and "connection closed after 4000" in r["msg"], r
    assert got == data[START:START + 4000]
