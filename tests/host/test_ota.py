"""Over-the-air updates end to end: signed bundles (tools/bundle.py) served over HTTP
(testbed/fileserver.py) to real Unix-port devices on a real mosquitto, each board in a process
of its own (its flash mounted, so the loader can import a slot from it)."""
import json
import os
import shutil

import pytest

from tools import bundle
from testbed.devices import ROOT, Spec
from testbed.fileserver import FileServer

FAST = {"keepalive": 5, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}


class Releases:
    """A key pair, bundles built from this checkout (or a changed copy) and a file server."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.pub, self.kid = bundle.keygen("fleet", str(tmp_path / "keys"))
        self.key = str(tmp_path / "keys" / "fleet.pem")
        os.makedirs(tmp_path / "srv", exist_ok=True)
        self.srv = FileServer(str(tmp_path / "srv")).start()

    def source(self, name, edit=None, path="firmware/app.py"):
        """A copy of the firmware's source with `edit(text of path) -> text` applied."""
        src = self.tmp / ("src-" + name)
        if not src.exists():
            for d in ("firmware", "lib"):
                shutil.copytree(os.path.join(ROOT, d), src / d,
                                ignore=shutil.ignore_patterns("__pycache__"))
            if edit:
                app = src / path
                text = app.read_text()
                edited = edit(text)
                assert edited != text, "the edit found nothing to change in " + path
                app.write_text(edited)
        return str(src)

    def build(self, name, version, src=None, key=None, **kw):
        out = str(self.tmp / "srv" / name)
        bundle.build(out, version, name="%d.0.0" % version, src=src, **kw)
        sha = bundle.sign(out, key or self.key)
        return {"version": version, "url": self.srv.url + name + "/", "manifest_sha256": sha}

    def close(self):
        self.srv.stop()


@pytest.fixture
def releases(tmp_path):
    r = Releases(tmp_path)
    yield r
    r.close()


def ota_device(fleet, tmp_path, dev, releases, confirm_s=60, reserve=65536, margin=300,
               **over):
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    cfg = fleet.config(dev, broker=FAST, telemetry_interval=0.3,
                       ota={"keys": [releases.pub], "confirm_s": confirm_s,
                            "deadline_margin_s": margin, "flash_reserve": reserve}, **over)
    return Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl))


def ota_states(observer, dev):
    return observer.json("devices/%s/ota" % dev)


def births(observer, dev):
    return [s for s in observer.json("devices/%s/status" % dev) if s["state"] == "online"]


def request(observer, req, layer="fleet/all/config/desired", version=1, **extra):
    doc = {"version": version, "ota": dict(req, window_s=extra.pop("window_s", 0), **extra)}
    observer.publish(layer, json.dumps(doc), retain=True)


# v2 prints where each module it runs came from (a namespace package: its path), once its
# devices are built.
_ORIGINS = """
    import json, sys
    print("modules: " + json.dumps(dict(
        (n, getattr(m, "__file__", None) or getattr(m, "__path__", None))
        for n, m in sys.modules.items())))
"""


def _app_modules(line):
    """{name: file} of the application's modules (firmware and lib/) in a `modules:` line."""
    mods = json.loads(line.split("modules: ", 1)[1])
    libs = set(os.listdir(os.path.join(ROOT, "lib")))
    return {n: f for n, f in mods.items()
            if n.split(".")[0] == "firmware" or n.split(".")[0] in libs}


def test_one_device_moves_to_v2_and_confirms(fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2, src=releases.source("origins", lambda t: t.replace(
        "    devices[0].heap_reserve = reserve\n",
        "    devices[0].heap_reserve = reserve\n" + _ORIGINS, 1), "firmware/run.py"))
    p = fleet.start(ota_device(fleet, tmp_path, "u1", releases))
    observer.wait(lambda m: births(observer, "u1"), 20, "online on v1")
    assert births(observer, "u1")[0]["fw"] == "0.1.0"
    request(observer, v2, reboot="now")
    observer.wait(lambda m: [b for b in births(observer, "u1") if b["fw"] == "2.0.0"], 60,
                  "online on v2")
    observer.wait(lambda m: [s for s in ota_states(observer, "u1")
                             if s["state"] == "confirmed" and s["version"] == 2], 60,
                  "v2 confirmed")
    out = p.output()
    assert "runner: board reset" in out
    # The device booted as a board does (boot.py, then main.py), and every module of the
    # application that runs is the slot's, none the factory image's.
    mods = _app_modules(p.wait_line(r"modules: ")[0])
    assert {"firmware", "firmware.run", "firmware.app", "firmware.version", "firmware.boards",
            "mqtt.client", "outbox"} <= set(mods), sorted(mods)
    assert not [n for n, f in mods.items() if not (f and f.startswith("/flash/ota/a/"))], mods
    assert "boot" not in mods
    b2 = [b for b in births(observer, "u1") if b["fw"] == "2.0.0"][0]
    assert b2["cause"] == "soft" and b2["boot"] == births(observer, "u1")[0]["boot"] + 1


def state_of(observer, dev, state, version, p=None):
    """The device's update state once it is `state` for `version` (p: the device's process,
    whose log a timeout shows)."""
    try:
        return observer.wait(lambda m: [s for s in ota_states(observer, dev)
                                        if s["state"] == state and s["version"] == version],
                             90, "%s %s %s" % (dev, state, version))[-1]
    except AssertionError as e:
        if p is None:
            raise
        log = [l for l in p.output().splitlines()
               if " telemetry" not in l and "connect failed" not in l]
        raise AssertionError("%s\ndevice log:\n%s" % (e, "\n".join(log[-40:])))


def seqs(observer, dev):
    return {(t["boot"], t["seq"]) for t in observer.json("devices/%s/telemetry" % dev)}


def no_gaps(observer, dev):
    """Every boot's telemetry numbered 1..n without a hole (what a consumer calls a gap)."""
    by_boot = {}
    for boot, seq in seqs(observer, dev):
        by_boot.setdefault(boot, set()).add(seq)
    return {b: s for b, s in by_boot.items() if s != set(range(1, max(s) + 1))}


def test_a_version_that_crashes_at_boot_is_rolled_back_by_the_loader(
        fleet, observer, tmp_path, releases):
    v3 = releases.build("v3", 3, src=releases.source("crash", lambda t: t + (
        "\nraise RuntimeError('v3 crashes at boot')\n")))
    p = fleet.start(ota_device(fleet, tmp_path, "c1", releases), restart=True)
    observer.wait(lambda m: births(observer, "c1"), 20, "online on v1")
    request(observer, v3, reboot="now")
    st = state_of(observer, "c1", "rolled_back", 3)
    assert "not confirmed after 3 boots" in st["reason"], st
    assert st["running"] == 1 and st["fw"] == "0.1.0"
    # Three boots of v3 died in the import; the fourth runs v1 again and publishes.
    assert p.output().count("v3 crashes at boot") >= 3
    b = births(observer, "c1")[-1]
    assert b["fw"] == "0.1.0" and b["boot"] >= 2, b
    n = len(seqs(observer, "c1"))
    observer.wait(lambda m: len(seqs(observer, "c1")) > n + 3, 20, "telemetry after rollback")
    assert not no_gaps(observer, "c1")
    # The request still stands; the device does not try v3 again.
    assert p.output().count("update to version 3: download") == 1
    # Ten requests whose manifests are signed by a key it does not trust (each noted by its
    # sha256, more than that list keeps), then v3 again: still refused, never downloaded.
    bogus = bogus_requests(releases, tmp_path, 10)
    for i, req in enumerate(bogus):
        request(observer, req, version=2 + i)
        _refused(observer, "c1", req["version"], "which this device does not trust")
    request(observer, v3, version=20, reboot="now")
    st = _refused(observer, "c1", 3, "refused on this device before")
    assert p.output().count("update to version 3: download") == 1
    assert births(observer, "c1")[-1]["fw"] == "0.1.0"


def bogus_requests(releases, tmp_path, n):
    """n requests for versions 4.. whose manifests (each its own) are signed by a key the
    devices do not trust."""
    bundle.keygen("bogus", str(tmp_path / "keys"))
    base = releases.build("bogus", 4, key=str(tmp_path / "keys" / "bogus.pem"))
    out = []
    for i in range(n):
        name = "bogus%d" % i
        d = tmp_path / "srv" / name
        shutil.copytree(tmp_path / "srv" / "bogus", d)
        doc = json.loads((d / "manifest.json").read_text())
        doc.update(version=4 + i, floor=4 + i)
        (d / "manifest.json").write_bytes(bundle.canonical(doc))
        sha = bundle.sign(str(d), str(tmp_path / "keys" / "bogus.pem"))
        out.append({"version": 4 + i, "url": releases.srv.url + name + "/",
                    "manifest_sha256": sha})
    return out


def test_a_release_whose_update_code_does_nothing_is_rolled_back_by_the_loaders_deadline(
        fleet, observer, tmp_path, releases):
    # v3 neither confirms nor rolls itself back: only the loader's deadline can end its trial.
    v3 = releases.build("v3", 3, src=releases.source("idle", lambda t: t.replace(
        "    async def _trial(self):\n",
        "    async def _trial(self):\n        await asyncio.Event().wait()\n", 1),
        "firmware/ota.py"))
    p = fleet.start(ota_device(fleet, tmp_path, "t1", releases, confirm_s=5, margin=3))
    observer.wait(lambda m: births(observer, "t1"), 20, "online on v1")
    request(observer, v3, reboot="now")
    st = state_of(observer, "t1", "rolled_back", 3, p)
    assert "not confirmed after 3 boots" in st["reason"], st
    out = p.output()
    assert out.count("runner: board reset by the trial deadline") == 3, out[-3000:]
    assert out.count("loader: version 3 on trial") == 3
    # v3 did run (online on 3.0.0) and never judged itself; then v1 again, for good.
    fws = [b["fw"] for b in births(observer, "t1")]
    assert "3.0.0" in fws and fws[-1] == "0.1.0", fws
    assert "version 3 rolled back" not in out and "version 3 confirmed" not in out


def test_a_version_that_never_reaches_the_broker_rolls_back_after_confirm_s(
        fleet, observer, tmp_path, releases):
    v3 = releases.build("v3", 3, src=releases.source("nobroker", lambda t: t.replace(
        "resolve=self.board.resolve,", "resolve=lambda h, p: self.board.resolve(h, p + 1),",
        1)))
    p = fleet.start(ota_device(fleet, tmp_path, "n1", releases, confirm_s=6), restart=True)
    observer.wait(lambda m: births(observer, "n1"), 20, "online on v1")
    request(observer, v3, reboot="now")
    st = state_of(observer, "n1", "rolled_back", 3, p)
    assert st["reason"].startswith("not confirmed within 6 s: no broker connection"), st
    assert "testing" in [s["state"] for s in ota_states(observer, "n1")] or True
    b = births(observer, "n1")[-1]
    assert b["fw"] == "0.1.0" and b["boot"] == 3, b  # v1, v3 (no broker), v1
    assert "n1 E version 3 rolled back: not confirmed within 6 s" in p.output()
    assert not no_gaps(observer, "n1")


def _refused(observer, dev, version, says):
    st = state_of(observer, dev, "failed", version)
    assert st.get("refused") is True and says in st["reason"], st
    return st


def _retrying(observer, dev, version, says):
    """The device's state once it retries `version`'s download for a reason saying `says`."""
    return observer.wait(lambda m: [s for s in ota_states(observer, dev)
                                    if s.get("version") == version and not s.get("refused")
                                    and says in (s.get("reason") or "")],
                         90, "%s retrying %s: %s" % (dev, version, says))[-1]


def test_bad_bundles_are_refused_or_retried_before_any_switch(
        fleet, observer, tmp_path, releases):
    other, _ = bundle.keygen("other", str(tmp_path / "keys"))
    p = fleet.start(ota_device(fleet, tmp_path, "r1", releases))
    q = fleet.start(ota_device(fleet, tmp_path, "r2", releases, reserve=4 << 20))
    observer.wait(lambda m: births(observer, "r1") and births(observer, "r2"), 20, "online")
    srv = tmp_path / "srv"
    n = 1
    cases = []
    # Signed by a key the device does not trust: refused for good.
    cases.append((releases.build("wrongkey", 2, key=str(tmp_path / "keys" / "other.pem")),
                  "which this device does not trust", True))
    # A file changed after signing: what the server sends is not what was signed, which a
    # lagging mirror or an upload in progress also does; retried, never taken.
    req = releases.build("changed", 3)
    f = srv / "changed" / "files" / "firmware" / "app.mpy"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    cases.append((req, "does not have the sha256 of the manifest", False))
    # A file cut short on the server: likewise.
    req = releases.build("truncated", 4)
    f = srv / "truncated" / "files" / "firmware" / "app.mpy"
    f.write_bytes(f.read_bytes()[:100])
    cases.append((req, "is 100 bytes on the server", False))
    # Native code for another architecture: refused for good.
    cases.append((releases.build("armv6m", 5, arch="armv6m"), "native code for armv6m", True))
    for req, says, refused in cases:
        n += 1
        request(observer, req, version=n)
        if refused:
            _refused(observer, "r1", req["version"], says)
        else:
            _retrying(observer, "r1", req["version"], says)
    # Larger than the flash this device has free (it keeps 4 MiB in reserve).
    big = releases.build("big", 6)
    request(observer, big, layer="devices/r2/config/desired")
    _refused(observer, "r2", 6, "bytes of flash")
    # Nothing switched, nothing rebooted.
    assert [b["boot"] for b in births(observer, "r1")] == [1]
    assert [b["boot"] for b in births(observer, "r2")] == [1]
    assert "board reset" not in p.output() + q.output()


def test_an_older_version_is_refused_unless_asked_and_never_below_the_floor(
        fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2, floor=1)  # its signed manifest allows going back to 1
    v1 = releases.build("v1", 1)
    p = fleet.start(ota_device(fleet, tmp_path, "o1", releases))
    observer.wait(lambda m: births(observer, "o1"), 20, "online on v1")
    request(observer, v2, reboot="now")
    state_of(observer, "o1", "confirmed", 2, p)
    request(observer, v1, version=2)
    _refused(observer, "o1", 1, "not newer than the running 2")
    assert "board reset" in p.output() and p.output().count("board reset") == 1
    request(observer, v1, version=3, downgrade=True, reboot="now")
    observer.wait(lambda m: births(observer, "o1")[-1]["fw"] == "1.0.0", 60, "back on 1.0.0")
    state_of(observer, "o1", "confirmed", 1)
    # v3 says nothing older than itself may follow it: once confirmed, a downgrade to v2 is
    # refused whatever the request says, without a download.
    v3 = releases.build("v3", 3)
    request(observer, v3, version=4, reboot="now")
    state_of(observer, "o1", "confirmed", 3, p)
    fetched = len(releases.srv.requests)
    request(observer, v2, version=5, downgrade=True, reboot="now")
    _refused(observer, "o1", 2, "below this device's security floor 3")
    assert births(observer, "o1")[-1]["fw"] == "3.0.0"
    assert len(releases.srv.requests) == fetched


def test_a_download_cut_by_the_server_resumes_where_it_stopped(
        fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2)
    fleet.start(ota_device(fleet, tmp_path, "d1", releases))
    observer.wait(lambda m: births(observer, "d1"), 20, "online on v1")
    srv = releases.srv
    # Every response ends after 3000 bytes of body, and the server dies once mid-download:
    # each file larger than that, and the one cut, arrive in pieces joined by Range requests.
    srv.cut_after(3000)
    srv.throttle(40000)
    request(observer, v2)
    observer.wait(lambda m: [s for s in ota_states(observer, "d1")
                             if s["state"] == "downloading" and s.get("progress", 0) >= 20],
                  60, "a fifth downloaded")
    srv.stop()
    srv.throttle(None)
    srv.start()
    state_of(observer, "d1", "confirmed", 2)
    resumed = [r for r in srv.requests if r.get("range") and r["range"][0] > 0]
    assert len(resumed) >= 5, srv.requests[-5:]
    # Resumed, not started again: no byte of a file was fetched twice.
    fetched = sum(r.get("bytes_sent", 0) for r in srv.requests if "/files/" in r["path"])
    total = json.loads((tmp_path / "srv" / "v2" / "manifest.json").read_text())["total"]
    assert fetched == total, (fetched, total)


def test_a_file_server_that_answers_404_at_first_is_waited_for(
        fleet, observer, tmp_path, releases):
    # The push raced the upload: for 10 s every file is missing. Not a refusal: the device
    # retries with backoff and completes once the files are there.
    v2 = releases.build("v2", 2)
    p = fleet.start(ota_device(fleet, tmp_path, "m1", releases))
    observer.wait(lambda m: births(observer, "m1"), 20, "online on v1")
    releases.srv.missing_for(10)
    request(observer, v2, reboot="now")
    state_of(observer, "m1", "confirmed", 2, p)
    codes = [r["status"] for r in releases.srv.requests]
    assert 404 in codes and codes[-1] in (200, 206), codes
    assert not [s for s in ota_states(observer, "m1") if s.get("refused")]


def test_a_lying_file_server_is_refused_without_a_task_death_or_a_leftover_slot(
        fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2)
    p = fleet.start(ota_device(fleet, tmp_path, "l1", releases))
    observer.wait(lambda m: births(observer, "l1"), 20, "online on v1")
    srv = releases.srv
    lies = ("wrong-range-start", "oversized", "no-content-range", "endless-header")
    for k, lie in enumerate(lies, 1):
        srv.lie(lie)
        # Counted from here: the last lie's download may have retried once more before its
        # request was withdrawn, but not after its slot was freed.
        seen = p.output().count("l1 W ota download: ")
        request(observer, v2, version=2 * k)
        # Its reply is refused (the download retries), then the request is withdrawn: the
        # download is abandoned and its slot emptied.
        p.wait_line(r"l1 W ota download: ", 60, count=seen + 1)
        assert [r for r in srv.requests if r["lie"] == lie]
        observer.publish("fleet/all/config/desired", json.dumps({"version": 2 * k + 1}),
                         retain=True)
        p.wait_line(r"l1 I ota: slot a freed", 60, count=k)
    out = p.output()
    assert "Traceback" not in out and "MemoryError" not in out, out[-3000:]
    assert not [l for l in out.splitlines() if "died" in l]
    assert not [s for s in ota_states(observer, "l1") if s.get("refused")]
    # The task lives on: an honest server's update goes through.
    srv.lie(None)
    request(observer, v2, version=200, reboot="now")
    state_of(observer, "l1", "confirmed", 2, p)
