"""A power cut at any moment of an update leaves a board that boots a working application:
the whole update (download over HTTP, check from flash, switch, first boot, confirm) run in
the Unix port on a littlefs image whose power is cut after every Nth block write; after
each cut the image is mounted again and the loader's choice is checked file by file."""
import json
import os
import subprocess

from tools import bundle
from testbed.devices import ROOT, micropython_path
from testbed.fileserver import FileServer

SCRIPT = r"""
import sys
sys.path[1:1] = [%(root)r, %(root)r + "/lib"]
import asyncio
import hashlib
import json
import os
from binascii import hexlify

import otaboot
from backoff import Rng
from firmware.ota import Updater
from unixflash import open_flash

URL, SHA, PUB, IMG = %(url)r, %(sha)r, %(pub)r, %(img)r
KEEP = {"/boot.json": '{"boot": 7}', "/config-cache.json": '{"layers": {}}',
        "/outbox.d/seg0": "x" * 3000}


def fresh():
    try:
        os.remove(IMG)
    except OSError:
        pass
    bdev, fs = open_flash(IMG, 1 << 20)
    fs.mkdir("/outbox.d")
    for p, t in KEEP.items():
        with fs.open(p, "w") as f:
            f.write(t)
    return bdev, fs


async def nothing(*a):
    pass


async def update(fs):
    u = Updater(fs, {"keys": [PUB], "confirm_s": 300, "deadline_margin_s": 300,
                    "flash_reserve": 0}, None, Rng(1),
                lambda l, m: None, nothing, nothing, lambda: ([], None), lambda: 0)
    req = {"version": 2, "url": URL, "manifest_sha256": SHA, "window_s": 0,
           "downgrade": False, "reboot": "now"}
    m = await u._download(req)
    otaboot.switch(fs, u.slot, 2, m["name"], SHA, 600)
    otaboot.boot(fs)  # the first boot of the new slot
    otaboot.confirm(fs)


def slot_ok(fs, slot):
    d = otaboot.slot_dir(slot)
    with fs.open(d + "/manifest.json", "rb") as f:
        m = json.loads(f.read())
    for path, size, sha in m["files"]:
        h = hashlib.sha256()
        with fs.open(d + "/" + path, "rb") as f:
            h.update(f.read())
        if fs.stat(d + "/" + path)[6] != size or hexlify(h.digest()).decode() != sha:
            return False
    return True


def power_back(k):
    bdev, fs = open_flash(IMG, 1 << 20)
    slot = otaboot.boot(fs)
    for p, t in KEEP.items():
        with fs.open(p, "r") as f:
            assert f.read() == t, (k, p)
    good = slot is None or slot_ok(fs, slot)
    rec = otaboot.read(fs)
    bdev.f.close()
    return slot, good, rec.get("state")


bdev, fs = fresh()
base = bdev.writes
asyncio.run(update(fs))
total = bdev.writes - base
bdev.f.close()
print("@@TOTAL", total, power_back(-1))
step = max(1, total // %(cuts)d)
# Every Nth write, and each of the last few: the switch, the first boot and the confirm.
for k in sorted(set(list(range(0, total + 1, step)) + list(range(total - 8, total + 1)))):
    bdev, fs = fresh()
    bdev.cut_after = bdev.writes + k
    try:
        asyncio.run(update(fs))
    except Exception as e:
        # After the cut the device is off: what its code then does no longer matters.
        if bdev.writes < bdev.cut_after:
            raise
    asyncio.new_event_loop()
    bdev.f.close()
    slot, good, state = power_back(k)
    # Power back once more, then the update again from where the flash is: it completes.
    bdev, fs = open_flash(IMG, 1 << 20)
    if otaboot.read(fs).get("state") == "confirmed" and otaboot.read(fs).get("active") is None:
        asyncio.run(update(fs))
        asyncio.new_event_loop()
    bdev.f.close()
    print("@@CUT", json.dumps({"k": k, "slot": slot, "good": good, "state": state,
                               "after": power_back(k)}))
"""


def test_a_power_cut_after_every_nth_block_write_of_an_update_leaves_a_bootable_board(
        tmp_path):
    pub, _ = bundle.keygen("k", str(tmp_path / "keys"))
    srv_root = tmp_path / "srv"
    out = str(srv_root / "v2")
    bundle.build(out, 2, name="2.0.0")
    sha = bundle.sign(out, str(tmp_path / "keys" / "k.pem"))
    with FileServer(str(srv_root)) as srv:
        script = tmp_path / "sweep.py"
        script.write_text(SCRIPT % {"root": ROOT, "url": srv.url + "v2/", "sha": sha,
                                    "pub": pub, "img": str(tmp_path / "cut.img"),
                                    "cuts": int(os.getenv("OTA_CUTS", "40"))})
        r = subprocess.run([micropython_path(), "-X", "heapsize=4m", str(script)],
                           capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    total = [l for l in r.stdout.splitlines() if l.startswith("@@TOTAL")][0]
    assert "'a', True, 'confirmed'" in total, total  # the uncut update ends on slot a
    cuts = [json.loads(l[6:]) for l in r.stdout.splitlines() if l.startswith("@@CUT")]
    assert len(cuts) >= 30, r.stdout[-2000:]
    bad = [c for c in cuts if not c["good"] or not c["after"][1]]
    assert not bad, bad
    # The sweep covers every phase: cuts that left the factory image, the new slot on
    # trial, and the new slot confirmed.
    assert {c["slot"] for c in cuts} == {None, "a"}, cuts
    assert {c["state"] for c in cuts if c["slot"] == "a"} >= {"testing", "confirmed"}, cuts
    # And after each, the update completes from what the flash held.
    assert all(c["after"][0] == "a" and c["after"][2] in ("confirmed", "testing")
               for c in cuts), [c for c in cuts if c["after"][0] != "a"]
