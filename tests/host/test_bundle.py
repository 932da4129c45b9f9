"""OTA bundles (tools/bundle.py: build, sign, keygen, verify) and the loopback file server
devices download them from (testbed/fileserver.py: Range, and the faults tests inject).
Waits are for events, polled with a deadline, never a fixed sleep."""
import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from tools import bundle
from testbed.devices import ROOT, micropython_path
from testbed.fileserver import FileServer

BUNDLE_PY = os.path.join(ROOT, "tools", "bundle.py")
DEADLINE_S = 60.0  # generous: CI machines are slow and busy


def wait_for(cond, what, timeout=DEADLINE_S):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for " + what)
        time.sleep(0.01)


# ---- bundles ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("release", "other"):
        pub, kid = bundle.keygen(name, str(d))
        out[name] = {"pem": str(d / (name + ".pem")), "pub": pub,
                     "pubfile": str(d / (name + ".pub")), "id": kid}
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """The repo's own firmware as bundle 7 "9.9.9-test", signed by the release key."""
    d = tmp_path_factory.mktemp("bundle") / "b"
    doc = bundle.build(str(d), 7, name="9.9.9-test")
    digest = bundle.sign(str(d), keys["release"]["pem"])
    return d, doc, digest


@pytest.fixture
def copy(signed, tmp_path):
    """A private copy of the signed bundle for a test to damage."""
    d = tmp_path / "b"
    shutil.copytree(signed[0], d)
    return d


def repo_sources():
    found = set()
    for top in ("firmware", "lib"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [x for x in dirnames if x != "__pycache__"]
            for fn in filenames:
                if fn.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)
                    found.add(rel[:-3] + ".mpy")
    return found


def test_build_sign_verify(signed, keys):
    d, doc, digest = signed
    data = (d / "manifest.json").read_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True,
                              separators=(",", ":")).encode("ascii")
    assert json.loads(data) == doc
    assert digest == hashlib.sha256(data).hexdigest() == bundle.manifest_sha256(str(d))
    assert doc["format"] == 1 and doc["version"] == 7 and doc["name"] == "9.9.9-test"
    assert doc["mpy"] == [6, 3] and doc["arch"] is None
    with open(os.path.join(ROOT, "firmware", "version.py")) as f:
        consts = bundle._int_constants(f.read())
    assert doc["needs"] == {"queue": consts.get("QUEUE_FORMAT", 1),
                            "cache": consts.get("CACHE_FORMAT", 1)}
    rels = [f[0] for f in doc["files"]]
    assert rels == sorted(rels)
    assert set(rels) == repo_sources()  # every .py compiled, nothing else (package.json)
    on_disk = {os.path.relpath(os.path.join(p, f), d / "files") for p, _, fs in
               os.walk(d / "files") for f in fs}
    assert on_disk == set(rels)
    for rel, size, sha in doc["files"]:
        blob = (d / "files" / rel).read_bytes()
        assert blob[:2] == b"M\x06", rel  # mpy v6
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (size, sha), rel
    assert doc["total"] == sum(f[1] for f in doc["files"])
    sig = json.loads((d / "manifest.sig").read_text())
    assert sig["key"] == keys["release"]["id"] and len(sig["sig"]) == 128
    int(sig["sig"], 16)
    # Either form of the public key, and a list where only one key is the signer's.
    bundle.verify(str(d), [keys["release"]["pub"]])
    bundle.verify(str(d), [keys["other"]["pubfile"], keys["release"]["pubfile"]])
    r = subprocess.run([sys.executable, BUNDLE_PY, "verify", "--bundle", str(d),
                        "--pub", keys["release"]["pubfile"]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digest in r.stdout


def test_bundle_version_module_runs(signed):
    d, _, _ = signed
    code = ("import sys; sys.path.insert(0, %r); import firmware.version as v; "
            "print(v.FW_VERSION, v.BUNDLE_VERSION, v.SCHEMA)" % str(d / "files"))
    r = subprocess.run([micropython_path(), "-c", code], capture_output=True, text=True,
                       cwd=str(d), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["9.9.9-test", "7"]


def test_build_from_other_tree(tmp_path):
    src = tmp_path / "src"
    (src / "firmware").mkdir(parents=True)
    (src / "lib" / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "firmware" / "version.py").write_text(
        'FW_VERSION = "1.0"\nQUEUE_FORMAT = 2\nCACHE_FORMAT = 3\nBUNDLE_VERSION = 1\nSCHEMA = 1\n')
    (src / "firmware" / "a.py").write_text("X = 1\n")
    (src / "lib" / "pkg" / "__init__.py").write_text("Y = 2\n")
    (src / "lib" / "pkg" / "package.json").write_text("{}")
    (src / "lib" / "pkg" / "__pycache__" / "junk.py").write_text("Z = 3\n")
    out = tmp_path / "out"
    (out / "files" / "stale").mkdir(parents=True)
    (out / "manifest.sig").write_text("{}")
    doc = bundle.build(str(out), 5, src=str(src), arch="xtensawin")
    assert doc["needs"] == {"queue": 2, "cache": 3}
    assert doc["arch"] == "xtensawin" and doc["name"] == "1.0"
    assert [f[0] for f in doc["files"]] == ["firmware/a.mpy", "firmware/version.mpy",
                                            "lib/pkg/__init__.mpy"]
    assert not (out / "files" / "stale").exists() and not (out / "manifest.sig").exists()
    text, name = bundle.version_source((src / "firmware" / "version.py").read_text(), 5)
    assert name == "1.0" and text.count("BUNDLE_VERSION") == 1 and "BUNDLE_VERSION = 5\n" in text
    text, _ = bundle.version_source('FW_VERSION = "0.1.0"\nSCHEMA = 1\n', 3, "2.0")
    assert 'FW_VERSION = "2.0"\n' in text and text.rstrip().endswith("BUNDLE_VERSION = 3")


def test_build_refuses(tmp_path):
    with pytest.raises(ValueError, match="version"):
        bundle.build(str(tmp_path / "o"), 0)
    with pytest.raises(ValueError, match="firmware/"):
        bundle.build(str(tmp_path / "o"), 1, src=str(tmp_path))
    r = subprocess.run([sys.executable, BUNDLE_PY, "build", "--out", str(tmp_path / "o"),
                        "--version", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and "version" in r.stderr


def flip_byte(d, keys=None):
    p = d / "files" / "firmware" / "app.mpy"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    return "firmware/app.mpy: SHA-256"


def truncate(d, keys=None):
    p = d / "files" / "lib" / "mqtt" / "client.mpy"
    p.write_bytes(p.read_bytes()[:-10])
    return "lib/mqtt/client.mpy: "


def resign_other(d, keys=None):
    bundle.sign(str(d), keys["other"]["pem"])
    return "not one of the given keys"


def claim_release_id(d, keys=None):
    # Signed by the other key but claiming the release key's id: the signature must fail.
    bundle.sign(str(d), keys["other"]["pem"])
    sig = json.loads((d / "manifest.sig").read_text())
    sig["key"] = keys["release"]["id"]
    (d / "manifest.sig").write_text(json.dumps(sig))
    return "bad signature"


def tamper_manifest(d, keys=None):
    doc = json.loads((d / "manifest.json").read_bytes())
    doc["version"] += 1  # still canonical: only the signature can tell
    (d / "manifest.json").write_bytes(bundle.canonical(doc))
    return "bad signature"


def hide_a_file(d, keys=None):
    # A changed file with the manifest "fixed" to match it: the signature must catch it.
    p = d / "files" / "firmware" / "app.mpy"
    p.write_bytes(p.read_bytes() + b"\0")
    doc = json.loads((d / "manifest.json").read_bytes())
    for f in doc["files"]:
        if f[0] == "firmware/app.mpy":
            f[1] += 1
            f[2] = hashlib.sha256(p.read_bytes()).hexdigest()
    doc["total"] += 1
    (d / "manifest.json").write_bytes(bundle.canonical(doc))
    return "bad signature"


def drop_sig(d, keys=None):
    (d / "manifest.sig").unlink()
    return "no manifest.sig"


@pytest.mark.parametrize("damage", [flip_byte, truncate, resign_other, claim_release_id,
                                    tamper_manifest, hide_a_file, drop_sig])
def test_verify_fails(copy, keys, damage):
    bundle.verify(str(copy), [keys["release"]["pub"]])  # sound before the damage
    expect = damage(copy, keys)
    with pytest.raises(ValueError) as e:
        bundle.verify(str(copy), [keys["release"]["pub"]])
    assert expect in str(e.value)
    r = subprocess.run([sys.executable, BUNDLE_PY, "verify", "--bundle", str(copy),
                        "--pub", keys["release"]["pub"]], capture_output=True, text=True)
    assert r.returncode != 0 and expect in r.stderr


def test_sign_refuses_a_broken_bundle(copy, keys):
    flip_byte(copy)
    before = (copy / "manifest.sig").read_bytes()
    with pytest.raises(ValueError, match="app.mpy"):
        bundle.sign(str(copy), keys["release"]["pem"])
    assert (copy / "manifest.sig").read_bytes() == before


# ---- keys ------------------------------------------------------------------------------


def test_keygen_cli_keeps_the_private_key_private(tmp_path):
    r = subprocess.run([sys.executable, BUNDLE_PY, "keygen", "--name", "k", "--dir",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pem = (tmp_path / "k.pem").read_text()
    assert "PRIVATE KEY" in pem
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    out = r.stdout + r.stderr
    assert "PRIVATE" not in out
    for line in body:
        assert line not in out and line[:16] not in out
    pub = (tmp_path / "k.pub").read_text()
    assert len(pub) == 131 and pub.endswith("\n") and pub.startswith("04")
    assert pub.strip() in r.stdout
    assert bundle.key_id(pub.strip()) in r.stdout
    assert bundle.pub_hex(str(tmp_path / "k.pem")) == pub.strip()

    # Never overwritten, by the CLI or the function.
    r = subprocess.run([sys.executable, BUNDLE_PY, "keygen", "--name", "k", "--dir",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr
    with pytest.raises(ValueError, match="exists"):
        bundle.keygen("k", str(tmp_path))
    assert (tmp_path / "k.pem").read_text() == pem


def test_keygen_refuses_a_committable_dir():
    d = tempfile.mkdtemp(prefix="keygen-guard-", dir=os.path.join(ROOT, "tests", "host"))
    try:
        for where in (d, os.path.join(d, "sub")):
            with pytest.raises(ValueError, match="not ignored"):
                bundle.keygen("k", where)
        assert os.listdir(d) == []  # nothing written, not even the subdirectory
    finally:
        shutil.rmtree(d)


def test_keygen_accepts_the_ignored_secrets_dir():
    secrets = os.path.join(ROOT, "secrets")
    made_secrets = not os.path.exists(secrets)
    d = os.path.join(secrets, "ota-test-%d-%s" % (os.getpid(), os.urandom(4).hex()))
    try:
        pub, kid = bundle.keygen("k", d)
        assert stat.S_IMODE(os.stat(os.path.join(d, "k.pem")).st_mode) == 0o600
        assert bundle.pub_hex(os.path.join(d, "k.pem")) == pub and bundle.key_id(pub) == kid
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if made_secrets:
            try:
                os.rmdir(secrets)
            except OSError:
                pass  # someone else put something there meanwhile


# ---- file server -----------------------------------------------------------------------

SIZE = 200_000


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "root"
    (root / "files" / "lib").mkdir(parents=True)
    data = os.urandom(SIZE)
    (root / "files" / "lib" / "blob.bin").write_bytes(data)
    (tmp_path / "secret.txt").write_text("outside the root")
    fs = FileServer(str(root)).start()
    yield fs, data
    fs.stop()


PATH = "/files/lib/blob.bin"


def get(fs, path=PATH, headers=None, timeout=DEADLINE_S):
    req = urllib.request.Request(fs.url + path.lstrip("/"), headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


def raw_conn(fs, path=PATH, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", fs.port, timeout=DEADLINE_S)
    c.request("GET", path, headers=headers or {})
    return c, c.getresponse()


def test_full_get_and_log(served):
    fs, data = served
    status, headers, body = get(fs)
    assert status == 200 and body == data
    assert headers["Content-Length"] == str(SIZE) and headers["Connection"] == "close"
    wait_for(lambda: fs.requests and fs.requests[-1]["done"], "the request to finish")
    e = fs.requests[-1]
    assert (e["path"], e["range"], e["status"], e["bytes_sent"]) == (PATH, None, 200, SIZE)
    assert isinstance(e["client"], int) and e["t"] <= time.time()
    req = urllib.request.Request(fs.url + PATH.lstrip("/"), method="HEAD")
    with urllib.request.urlopen(req, timeout=DEADLINE_S) as r:
        assert r.headers["Content-Length"] == str(SIZE) and r.read() == b""


def test_range_get(served):
    fs, data = served
    status, headers, body = get(fs, headers={"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Range"] == "bytes 1000-1999/%d" % SIZE
    assert headers["Content-Length"] == "1000"
    status, headers, body = get(fs, headers={"Range": "bytes=150000-"})
    assert status == 206 and body == data[150000:]
    assert headers["Content-Range"] == "bytes 150000-%d/%d" % (SIZE - 1, SIZE)
    assert fs.requests[-1]["range"] == (150000, SIZE - 1)


def test_range_past_the_end_is_416(served):
    fs, _ = served
    for start in (SIZE, SIZE + 100):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(fs, headers={"Range": "bytes=%d-" % start})
        assert e.value.code == 416
        assert e.value.headers["Content-Range"] == "bytes */%d" % SIZE


def test_no_escape_no_listing(served):
    fs, _ = served
    for path in ("/../secret.txt", "/files/../../secret.txt", "/%2e%2e/secret.txt",
                 "/files/", "/files/lib", "/nope"):
        c, r = raw_conn(fs, path)
        assert r.status == 404, path
        r.read()
        c.close()


def test_stop_cuts_mid_body_then_restart_on_the_same_port(served):
    fs, data = served
    fs.throttle(20_000)  # 10 s for the whole body: stop() lands in the middle
    c, r = raw_conn(fs)
    assert r.status == 200
    got = r.read(2048)
    port = fs.port
    fs.stop()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        got += r.read()
    c.close()
    assert len(got) < SIZE
    with pytest.raises(OSError):  # the listener is gone too
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S).close()

    fs.throttle(None)
    fs.start()
    assert fs.port == port
    assert get(fs)[2] == data
    # restart() while a download is in flight: cut, and back on the same port.
    fs.throttle(20_000)
    c, r = raw_conn(fs)
    got = r.read(1024)
    fs.restart()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        r.read()
    c.close()
    fs.throttle(None)
    assert fs.port == port and get(fs)[2] == data


def test_throttle_slows_the_body(served):
    fs, data = served
    fs.throttle(100_000)
    t0 = time.monotonic()
    status, _, body = get(fs, headers={"Range": "bytes=0-39999"})
    # A lower bound only: a busy machine makes it slower, never faster.
    assert body == data[:40000] and time.monotonic() - t0 >= 0.35


def test_stall_holds_the_body_until_unstalled(served):
    fs, data = served
    fs.stall(DEADLINE_S)
    s = socket.create_connection(("127.0.0.1", fs.port), timeout=DEADLINE_S)
    try:
        s.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, "closed before the headers"
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        wait_for(lambda: fs.held == 1, "the body to be held")
        # Held: the server is parked before the body, so nothing after the headers arrived.
        assert rest == b"" and fs.requests[-1]["bytes_sent"] == 0 and fs.active == 1
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
        s.setblocking(True)
        s.settimeout(DEADLINE_S)
        fs.stall(None)
        while len(rest) < SIZE:
            chunk = s.recv(65536)
            assert chunk, "closed mid-body"
            rest += chunk
        assert rest == data
    finally:
        s.close()
    wait_for(lambda: fs.held == 0 and fs.active == 0, "the handler to finish")


def test_cut_after_gives_a_short_body(served):
    fs, data = served
    fs.cut_after(1000)
    for headers in ({}, {"Range": "bytes=5000-"}):
        c, r = raw_conn(fs, headers=headers)
        with pytest.raises(http.client.IncompleteRead) as e:
            r.read()
        c.close()
        start = 5000 if headers else 0
        assert e.value.partial == data[start:start + 1000]
    wait_for(lambda: all(e["done"] for e in fs.requests), "the handlers to finish")
    assert [e["bytes_sent"] for e in fs.requests] == [1000, 1000]
    fs.cut_after(None)
    assert get(fs)[2] == data


def test_concurrent_max_counts_parallel_downloads(served):
    fs, data = served
    assert fs.concurrent_max == 0
    fs.stall(DEADLINE_S)  # both bodies held: they are in flight together for certain
    bodies = []

    def fetch():
        bodies.append(get(fs)[2])

    threads = [threading.Thread(target=fetch, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: fs.active == 2, "two bodies in flight")
    fs.stall(None)
    for t in threads:
        t.join(DEADLINE_S)
    assert bodies == [data, data]
    assert fs.concurrent_max == 2
    wait_for(lambda: fs.active == 0, "both handlers to finish")
    get(fs)  # one at a time afterwards: the maximum stays
    assert fs.concurrent_max == 2
