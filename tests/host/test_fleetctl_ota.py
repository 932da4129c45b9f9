"""tools/fleetctl.py ota push and ota status, run as a subprocess against a real mosquitto.
push: what reaches the broker is read back with observers (the retained layer, not the CLI's
word); status: the devices are fakes, just the retained documents a device would leave.
Waits are for events (messages, a marker published after the run), never fixed sleeps."""
import json
import os
import shutil
import time

import pytest

from tests.host.test_fleetctl import fleetctl
from testbed import pki
from tools import bundle
from testbed.broker import free_port
from testbed.fileserver import FileServer
from testbed.observer import Observer


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("release", "other"):
        pub, _ = bundle.keygen(name, str(d))
        out[name] = {"pem": str(d / (name + ".pem")), "pub": pub,
                     "pubfile": str(d / (name + ".pub"))}
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """The repo's firmware as bundle 2 "2.0.0", signed by the release key: (dir, digest)."""
    d = tmp_path_factory.mktemp("bundle") / "b2"
    bundle.build(str(d), 2, name="2.0.0")
    return str(d), bundle.sign(str(d), keys["release"]["pem"])


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 it signed, and a CA that signed nothing
    here."""
    d = tmp_path_factory.mktemp("pki")
    pki.ca(d, "ca")
    pki.ca(d, "rogue-ca")
    pki.leaf(d, "server", "ca", san="DNS:localhost,IP:127.0.0.1")
    return d


@pytest.fixture
def files(signed):
    """The bundle's parent directory over HTTP: the bundle is at files.url + "b2/"."""
    with FileServer(os.path.dirname(signed[0])) as srv:
        yield srv


def retained_doc(broker, topic):
    """The retained document on `topic`, read by a new subscriber."""
    o = Observer(broker.host, broker.port, topics=(topic,))
    try:
        m = o.wait(lambda ms: [x for x in ms if x[1] == topic and x[3]], 10, "retained " + topic)
        return json.loads(m[-1][2])
    finally:
        o.close()


def settle(observer):
    """Returns once everything published before it has reached the observer: a marker of
    its own comes back after them."""
    token = os.urandom(8).hex().encode()
    observer.publish("test/marker", token)
    observer.wait(lambda ms: [m for m in ms if m[1] == "test/marker" and m[2] == token], 10,
                  "marker")


def test_push_publishes_the_request_into_the_layer_keeping_its_other_keys(
        broker, observer, signed, keys, files, certs):
    path, digest = signed
    url = files.url + "b2/"
    topic = "fleet/canary/config/desired"
    old = {"version": 1, "url": "http://old/b1/", "manifest_sha256": "0" * 64,
           "window_s": 60, "downgrade": True}
    observer.publish(topic, json.dumps({"version": 4, "telemetry_interval": 30,
                                        "reconnect": {"cap": 300}, "ota": old}), retain=True)
    r = fleetctl(broker, "ota", "push", "--group", "canary", "--bundle", path,
                 "--url", url[:-1], "--pub", keys["release"]["pubfile"],
                 "--window", "600", "--reboot", "now")
    assert r.returncode == 0, r.stderr
    want = {"version": 5, "telemetry_interval": 30, "reconnect": {"cap": 300},
            "ota": {"version": 2, "url": url, "manifest_sha256": digest,
                    "window_s": 600, "reboot": "now"}}
    # It fetched what devices will, first: the manifest, then its signature.
    assert [q["path"] for q in files.requests] == ["/b2/manifest.json", "/b2/manifest.sig"]
    assert [q["status"] for q in files.requests] == [200, 200]
    # The layer's next version, its other keys kept, the old request replaced whole.
    assert retained_doc(broker, topic) == want
    lines = r.stdout.splitlines()
    assert lines[0].startswith(topic + " ") and json.loads(lines[0][len(topic) + 1:]) == want
    assert "layer canary version 5" in lines[1] and "bundle version 2 (2.0.0)" in lines[1]
    assert digest in lines[1]

    # One device's layer, no key given (signature file present, files checked), default
    # window; the layer's version goes past the one the device reports as applied. Served
    # over https, by a certificate of a CA that the system's CA file ($SSL_CERT_FILE) holds.
    observer.publish("devices/d1/config/reported",
                     json.dumps({"effective": {}, "versions": {"device": 7}}), retain=True)
    with FileServer(os.path.dirname(path), tls=(str(certs / "server.pem"),
                                               str(certs / "server.key"))) as https:
        r = fleetctl(broker, "ota", "push", "--device", "d1", "--bundle", path,
                     "--url", https.url + "b2/", "--downgrade",
                     env={"SSL_CERT_FILE": str(certs / "ca.pem")})
        assert r.returncode == 0, r.stderr
        assert [q["status"] for q in https.requests] == [200, 200]
    assert retained_doc(broker, "devices/d1/config/desired") == {
        "version": 8, "ota": {"version": 2, "url": https.url + "b2/",
                              "manifest_sha256": digest, "window_s": 3600, "downgrade": True}}

    # --dry-run prints the next layer and publishes nothing.
    n = len(observer.matching(topic))
    r = fleetctl(broker, "ota", "push", "--group", "canary", "--bundle", path,
                 "--url", url, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "(dry run, not published)" in r.stdout and '"version": 6' in r.stdout
    settle(observer)
    assert len(observer.matching(topic)) == n
    assert retained_doc(broker, topic) == want

    # `set` on that layer keeps the request whole (an object setting, not dotted names).
    r = fleetctl(broker, "set", "--group", "canary", "log_level=warn")
    assert r.returncode == 0, r.stderr
    assert retained_doc(broker, topic) == dict(want, version=6, log_level="warn")


def test_push_refuses_a_bad_bundle_and_publishes_nothing(broker, observer, signed, keys,
                                                         tmp_path):
    path, _ = signed
    bad = str(tmp_path / "b2")
    shutil.copytree(path, bad)
    rel = json.load(open(os.path.join(bad, "manifest.json")))["files"][0][0]
    victim = os.path.join(bad, "files", *rel.split("/"))
    base = ["ota", "push", "--group", "all", "--bundle", bad, "--url", "http://h:1/b2/"]

    def refused(*extra):
        r = fleetctl(broker, *(base + list(extra)))
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and "refused, nothing published" in r.stderr, r.stderr
        return r.stderr

    # A file of another size, with or without a key to check the signature with.
    with open(victim, "ab") as f:
        f.write(b"\0")
    assert "%s: " % rel in refused() and "manifest says" in refused()
    assert rel in refused("--pub", keys["release"]["pubfile"])
    # The same size, other bytes.
    data = bytearray(open(victim, "rb").read()[:-1])
    data[-1] ^= 0xFF
    with open(victim, "wb") as f:
        f.write(data)
    assert "%s: SHA-256 differs" % rel in refused()
    shutil.copy(os.path.join(path, "files", *rel.split("/")), victim)
    # Signed by a key not given; a manifest changed after signing; no signature at all.
    assert "not one of the given keys" in refused("--pub", keys["other"]["pub"])
    man = os.path.join(bad, "manifest.json")
    doc = json.load(open(man))
    doc["version"] = 3
    with open(man, "wb") as f:
        f.write(bundle.canonical(doc))
    assert "bad signature" in refused("--pub", keys["release"]["pubfile"])
    os.remove(os.path.join(bad, "manifest.sig"))
    assert "no manifest.sig" in refused()
    # A URL devices could not use is the firmware's check, before any connection too.
    shutil.copy(os.path.join(path, "manifest.sig"), bad)
    shutil.copy(os.path.join(path, "manifest.json"), bad)
    r = fleetctl(broker, "ota", "push", "--group", "all", "--bundle", bad, "--url", "ftp://h/b2/")
    assert r.returncode == 2 and "ota.url must be" in r.stderr, r.stderr
    settle(observer)
    assert observer.matching("config/desired") == []


def test_push_publishes_nothing_unless_the_url_serves_the_bundle(
        broker, observer, signed, keys, files, certs, tmp_path):
    """A push racing the upload, a wrong URL, another bundle left there, an untrusted https
    server: exit 5 with the reason in one line, and the retained layers as they were."""
    path, digest = signed
    topic = "fleet/canary/config/desired"
    before = {"version": 4, "telemetry_interval": 30}
    observer.publish(topic, json.dumps(before), retain=True)
    settle(observer)

    def refused(url, *extra, env=None, target=("--group", "canary"), pre=()):
        r = fleetctl(broker, *pre, "ota", "push", *target, "--bundle", path, "--url", url,
                     "--pub", keys["release"]["pubfile"], *extra, env=env)
        assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1, (r.stdout, r.stderr)
        assert "nothing published" in r.stderr and "--no-url-check" in r.stderr, r.stderr
        return r.stderr

    # Nothing listens there (the file server is down).
    dead = "http://127.0.0.1:%d/b2/" % free_port()
    assert "GET %smanifest.json: connection refused" % dead in refused(dead)
    # The server is up but the bundle is not uploaded yet (or the URL is wrong), also for
    # one device's layer and with --dry-run.
    assert "manifest.json: HTTP 404" in refused(files.url + "b3/")
    assert "HTTP 404" in refused(files.url + "b3/", target=("--device", "d9"))
    assert "HTTP 404" in refused(files.url + "b3/", "--dry-run")
    # Another manifest is served there: an older bundle left at that URL, or an upload
    # that has not replaced it yet.
    other = tmp_path / "srv" / "b2"
    shutil.copytree(path, str(other))
    doc = json.load(open(other / "manifest.json"))
    doc["version"] = 1
    (other / "manifest.json").write_bytes(bundle.canonical(doc))
    with FileServer(str(tmp_path / "srv")) as srv:
        err = refused(srv.url + "b2/")
        assert "manifest.json: SHA-256 " in err and "not the bundle's %s" % digest[:16] in err
        assert [q["path"] for q in srv.requests] == ["/b2/manifest.json"]
        # The manifest but no signature yet (uploaded in that order), or another one.
        shutil.copy(os.path.join(path, "manifest.json"), str(other))
        os.remove(str(other / "manifest.sig"))
        assert "manifest.sig: HTTP 404" in refused(srv.url + "b2/")
        (other / "manifest.sig").write_bytes(b'{"key": "00", "sig": "00"}')
        assert "manifest.sig: not the bundle's manifest.sig" in refused(srv.url + "b2/")
        # A server that sends its headers and then nothing: bounded by --timeout.
        shutil.copy(os.path.join(path, "manifest.sig"), str(other))
        srv.stall(30)
        t = time.monotonic()
        assert "no answer within 1 s" in refused(srv.url + "b2/", pre=("--timeout", "1"))
        assert time.monotonic() - t < 10
        srv.stall(None)
    # https whose certificate no trusted CA signed.
    with FileServer(os.path.dirname(path), tls=(str(certs / "server.pem"),
                                               str(certs / "server.key"))) as https:
        err = refused(https.url + "b2/", env={"SSL_CERT_FILE": str(certs / "rogue-ca.pem")})
        assert "TLS: the server's certificate does not verify" in err, err

    settle(observer)
    assert [json.loads(m[2]) for m in observer.matching("config/desired")] == [before]
    assert retained_doc(broker, topic) == before

    # --no-url-check: published before the upload, on purpose.
    n = len(files.requests)
    r = fleetctl(broker, "ota", "push", "--group", "canary", "--bundle", path,
                 "--url", files.url + "b3/", "--no-url-check")
    assert r.returncode == 0, r.stderr
    assert retained_doc(broker, topic)["ota"]["url"] == files.url + "b3/"
    assert len(files.requests) == n


def fake_device(observer, dev, ota=None, versions=None, state="online"):
    """What a device leaves retained: its status, reported config and update state."""
    observer.publish("devices/%s/status" % dev,
                     json.dumps({"state": state, "fw": "1.0.0", "boot": 3}), retain=True)
    if versions is not None:
        observer.publish("devices/%s/config/reported" % dev,
                         json.dumps({"effective": {}, "versions": versions}), retain=True)
    if ota is not None:
        observer.publish("devices/%s/ota" % dev, json.dumps(ota), retain=True)


def ota_doc(state, version=2, running=1, **kw):
    d = {"state": state, "version": version, "running": running, "fw": "%d.0.0" % running}
    d.update(kw)
    return d


def test_status_counts_states_lists_failures_and_pending_and_filters_by_group(broker, observer):
    canary = {"all": 1, "canary": 3}
    fake_device(observer, "d1", ota_doc("confirmed", running=2, name="2.0.0"), canary)
    fake_device(observer, "d2", ota_doc("confirmed", running=2), canary)
    fake_device(observer, "d3", ota_doc("failed", reason="bad signature by key ab12",
                                        refused=True), canary)
    fake_device(observer, "d4", ota_doc("rolled_back", reason="not confirmed within 120 s: "
                                        "no broker"), {"all": 1, "model-x": 2})
    fake_device(observer, "d5", ota_doc("downloading", progress=40), {"model-x": 2})
    fake_device(observer, "d6", ota_doc("staged"), canary, state="offline")
    fake_device(observer, "d7", None, canary)  # a firmware without updates
    fake_device(observer, "d8", {"state": "idle"})  # nothing applied yet: in no group
    fake_device(observer, "d9", ota_doc("confirmed", version=1, running=1), {"all": 1})

    r = fleetctl(broker, "ota", "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"] == 9
    assert doc["states"] == {"confirmed": {"2": 2, "1": 1}, "failed": {"2": 1},
                             "rolled_back": {"2": 1}, "downloading": {"2": 1},
                             "staged": {"2": 1}, "idle": {"null": 1}, "unknown": {"null": 1}}
    assert doc["running"] == {"1": 5, "2": 2}
    assert [(f["device"], f["version"], f["reason"], f["refused"]) for f in doc["failed"]] == [
        ("d3", 2, "bad signature by key ab12", True)]
    assert [(f["device"], f["reason"]) for f in doc["rolled_back"]] == [
        ("d4", "not confirmed within 120 s: no broker")]
    assert [(p["device"], p["state"], p.get("progress"), p["online"])
            for p in doc["pending"]] == [("d5", "downloading", 40, "online"),
                                         ("d6", "staged", None, "offline")]

    # A group: the devices that have applied one of its layers; "all" is every device.
    r = fleetctl(broker, "ota", "status", "--group", "canary", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"] == 5
    assert doc["states"] == {"confirmed": {"2": 2}, "failed": {"2": 1}, "staged": {"2": 1},
                             "unknown": {"null": 1}}
    assert doc["rolled_back"] == [] and [p["device"] for p in doc["pending"]] == ["d6"]
    r = fleetctl(broker, "ota", "status", "--group", "model-x", "--json")
    assert json.loads(r.stdout)["states"] == {"rolled_back": {"2": 1}, "downloading": {"2": 1}}
    r = fleetctl(broker, "ota", "status", "--group", "all", "--json")
    assert json.loads(r.stdout)["devices"] == 9
    r = fleetctl(broker, "ota", "status", "--group", "nobody", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "devices": 0, "states": {}, "running": {}, "failed": [], "rolled_back": [],
        "pending": []}

    # The human form: counts, then the failures with their reasons, then what is under way.
    r = fleetctl(broker, "ota", "status", "--group", "canary")
    assert r.returncode == 0, r.stderr
    lines = [l.split() for l in r.stdout.splitlines()]
    assert lines[0] == ["5", "devices", "in", "group", "canary"]
    assert lines[1] == ["STATE", "VERSION", "DEVICES"]
    assert ["confirmed", "2", "2"] in lines and ["unknown", "-", "1"] in lines
    out = r.stdout
    assert out.index("failed:") < out.index("d3 version 2 (refused): bad signature by key ab12")
    assert out.index("in progress:") < out.index("d6 staged version 2 (offline)")
    assert "d4" not in out and "d5" not in out

    # A bad group name is refused as by set.
    r = fleetctl(broker, "ota", "status", "--group", "a/b")
    assert r.returncode == 2 and "group must be" in r.stderr
