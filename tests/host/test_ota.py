"""Over-the-air updates end to end: signed bundles (tools/bundle.py) served over HTTP
(tools/fileserver.py) to real Unix-port devices on a real mosquitto, each board in a process
of its own (its flash mounted, so the loader can import a slot from it)."""
import json
import os
import shutil

import pytest

from tools import bundle
from tools.devices import ROOT, Spec
from tools.fileserver import FileServer

FAST = {"keepalive": 5, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}


class Releases:
    """A key pair, bundles built from this checkout (or a changed copy) and a file server."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.pub, self.kid = bundle.keygen("fleet", str(tmp_path / "keys"))
        self.key = str(tmp_path / "keys" / "fleet.pem")
        os.makedirs(tmp_path / "srv", exist_ok=True)
        self.srv = FileServer(str(tmp_path / "srv")).start()

    def source(self, name, edit=None):
        """A copy of the firmware's source with `edit(text of app.py) -> text` applied."""
        src = self.tmp / ("src-" + name)
        if not src.exists():
            for d in ("firmware", "lib"):
                shutil.copytree(os.path.join(ROOT, d), src / d,
                                ignore=shutil.ignore_patterns("__pycache__"))
            if edit:
                app = src / "firmware" / "app.py"
                app.write_text(edit(app.read_text()))
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


def ota_device(fleet, tmp_path, dev, releases, confirm_s=60, **over):
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    cfg = fleet.config(dev, broker=FAST, telemetry_interval=0.3,
                       ota={"keys": [releases.pub], "confirm_s": confirm_s}, **over)
    return Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl))


def ota_states(observer, dev):
    return observer.json("devices/%s/ota" % dev)


def births(observer, dev):
    return [s for s in observer.json("devices/%s/status" % dev) if s["state"] == "online"]


def request(observer, req, layer="fleet/all/config/desired", version=1, **extra):
    doc = {"version": version, "ota": dict(req, window_s=extra.pop("window_s", 0), **extra)}
    observer.publish(layer, json.dumps(doc), retain=True)


def test_one_device_moves_to_v2_and_confirms(fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2)
    p = fleet.start(ota_device(fleet, tmp_path, "u1", releases))
    observer.wait(lambda m: births(observer, "u1"), 20, "online on v1")
    assert births(observer, "u1")[0]["fw"] == "0.1.0"
    request(observer, v2, reboot="now")
    try:
        observer.wait(lambda m: [b for b in births(observer, "u1") if b["fw"] == "2.0.0"], 60,
                  "online on v2")
    except AssertionError:
        print("\n".join(l for l in p.output().splitlines() if "telemetry" not in l)[-3000:])
        raise
    observer.wait(lambda m: [b for b in births(observer, "u1") if b["fw"] == "2.0.0"], 60,
                  "online on v2")
    observer.wait(lambda m: [s for s in ota_states(observer, "u1")
                             if s["state"] == "confirmed" and s["version"] == 2], 60,
                  "v2 confirmed")
    out = p.output()
    assert "runner: board reset" in out
    b2 = [b for b in births(observer, "u1") if b["fw"] == "2.0.0"][0]
    assert b2["cause"] == "soft" and b2["boot"] == births(observer, "u1")[0]["boot"] + 1
