# The loader's boot record (otaboot.py) and the update checks of firmware/ota.py that need no
# network: the security floor, versions refused for good, what a manifest may install, and a
# factory image that finds a trial it is not running.
import json

import otaboot
from firmware import ota, otacheck
from firmware.version import BUNDLE_VERSION
from mpyutil import CREATED, fresh_image, raises
from unixflash import open_flash

SHA = "ab" * 32
KEY = "04" + "11" * 64


def _fs():
    return open_flash(fresh_image("otaboot"), 262144)[1]


def _slot(fs, slot, ok=True):
    for d in ("/ota", "/ota/" + slot):
        try:
            fs.mkdir(d)
        except OSError:
            pass
    if ok:
        with fs.open("/ota/%s/ok" % slot, "w") as f:
            f.write("1")


def _trial_of(fs, slot, version, floor=None, keys=None):
    _slot(fs, slot)
    trial = {"floor": floor or version}
    if keys:
        trial["keys"] = keys
    otaboot.switch(fs, slot, version, "%d.0.0" % version, SHA, 60, trial)
    return otaboot.boot(fs)


def test_a_confirmed_release_raises_the_floor_and_hands_over_its_keys():
    fs = _fs()
    assert otaboot.floor(otaboot.read(fs)) == 1
    assert _trial_of(fs, "a", 3, floor=2, keys=[KEY]) == "a"
    rec = otaboot.read(fs)
    assert otaboot.floor(rec) == 1 and not rec.get("keys")  # only a confirm takes effect
    rec = otaboot.confirm(fs)
    assert otaboot.floor(rec) == 2 and rec["keys"] == [KEY]
    assert "trial" not in rec and "deadline_s" not in rec
    # A later release with a lower floor never lowers it.
    _trial_of(fs, "b", 4, floor=1)
    assert otaboot.floor(otaboot.confirm(fs)) == 2


def test_a_rolled_back_release_stays_refused_whatever_is_noted_after_it():
    fs = _fs()
    _trial_of(fs, "a", 3)
    otaboot.roll_back(fs, "crashed")
    for i in range(10):  # bogus requests: refused by their manifest's sha256
        otaboot.note(fs, {"state": "failed"}, bad_sha="%064x" % i)
    rec = otaboot.read(fs)
    assert otaboot.refused(rec, 3)
    assert len(rec["bad"]) == otaboot.BAD_SHA_MAX
    # Versions refused for good are bounded too; the lowest go first.
    for v in range(10, 10 + otaboot.REFUSED_MAX + 2):
        otaboot.note(fs, {"state": "failed"}, bad_version=v)
    rec = otaboot.read(fs)
    assert len(rec["refused"]) == otaboot.REFUSED_MAX
    assert not otaboot.refused(rec, 3) and otaboot.refused(rec, 10 + otaboot.REFUSED_MAX + 1)


def test_a_rollback_to_an_incomplete_slot_runs_the_factory_image():
    fs = _fs()
    _trial_of(fs, "a", 2)
    otaboot.confirm(fs)
    _trial_of(fs, "b", 3)
    assert otaboot.read(fs)["prev"] == "a"
    fs.remove("/ota/a/ok")  # the slot to go back to was being overwritten
    for _ in range(otaboot.TRIES - 1):  # _trial_of booted it once
        assert otaboot.boot(fs) == "b"
    assert otaboot.boot(fs) is None
    rec = otaboot.read(fs)
    assert rec["active"] is None and rec["version"] is None
    assert rec["result"]["state"] == "rolled_back" and otaboot.refused(rec, 3)


def test_manifest_paths_that_are_not_the_applications_are_refused():
    good = ["firmware/app.mpy", 10, SHA]
    assert otaboot.bad_entry(good) is None
    assert otaboot.bad_entry(["lib/mqtt/client.mpy", 0, SHA]) is None
    for path in ("ok", "", "./x", "x/../y", "manifest.json", "otaboot.mpy", "firmware",
                 "lib/otaboot.mpy", "lib/unixflash.mpy", "lib/main.mpy", "lib/boot.mpy",
                 "lib/otaboot/__init__.mpy", "lib/firmware/app.mpy", "firmware//app.mpy",
                 "firmware/./app.mpy", "/firmware/app.mpy", "firmware/app.py",
                 "other/x.mpy", "firmware\\app.mpy"):
        assert otaboot.bad_entry([path, 10, SHA]), path
    assert otaboot.bad_entry(["firmware/app.mpy", -1, SHA])
    assert otaboot.bad_entry(["firmware/app.mpy", True, SHA])
    assert otaboot.bad_entry(["firmware/app.mpy", 10, "AB" * 32])
    assert otaboot.bad_entry(["firmware/app.mpy", 10])
    assert otaboot.bad_entry("firmware/app.mpy")


def _manifest(files, version=BUNDLE_VERSION + 1, **kw):
    major, sub, _ = otacheck.abi()
    m = {"format": 1, "version": version, "floor": version, "mpy": [major, sub],
         "arch": None, "files": files, "total": sum(f[1] for f in files)}
    m.update(kw)
    return m


def _req(version=BUNDLE_VERSION + 1, downgrade=False):
    return {"version": version, "downgrade": downgrade}


def test_the_device_refuses_the_manifests_bundle_py_would_not_build():
    f = ["firmware/app.mpy", 10, SHA]
    otacheck.check_manifest(_manifest([f]), _req())
    for files in ([["ok", 1, SHA]], [["", 1, SHA]], [["./x", 1, SHA]],
                  [["manifest.json", 1, SHA]], [["otaboot.mpy", 1, SHA]],
                  [["lib/otaboot.mpy", 1, SHA]], [f, f], [["lib/a.mpy", 1, SHA], f],
                  [["firmware/app.mpy", -5, SHA]]):
        e = raises(otacheck.Refused, otacheck.check_manifest, _manifest(files), _req())
        assert "bad file entry" in str(e) and e.release, (files, e)
    e = raises(otacheck.Refused, otacheck.check_manifest, _manifest([f], floor=BUNDLE_VERSION + 2), _req())
    assert "floor" in str(e)
    e = raises(otacheck.Refused, otacheck.check_manifest, _manifest([f], keys=["04zz"]), _req())
    assert "keys" in str(e)


def test_the_floor_refuses_a_downgrade_whatever_the_request_says():
    f = ["firmware/app.mpy", 10, SHA]
    old = BUNDLE_VERSION + 1
    # A downgrade below the floor; and one the floor allows.
    e = raises(otacheck.Refused, otacheck.check_manifest, _manifest([f], version=old),
               _req(old, downgrade=True), old + 5, old + 1)
    assert "below this device's security floor" in str(e), e
    otacheck.check_manifest(_manifest([f], version=old, floor=1), _req(old, downgrade=True),
                       old + 5, old)
    # A manifest for another version than the request names blames the request only.
    e = raises(otacheck.Refused, otacheck.check_manifest, _manifest([f]), _req(BUNDLE_VERSION + 2))
    assert not e.release


def _updater(fs):
    async def nothing(*a):
        pass

    from backoff import Rng

    logs = []
    u = ota.Updater(fs, {"keys": [KEY], "confirm_s": 300, "deadline_margin_s": 60,
                         "flash_reserve": 0}, None, Rng(1),
                    lambda level, m: logs.append(m), nothing, nothing,
                    lambda: ([], None), lambda: 0)
    return u, logs


def test_the_factory_image_never_confirms_a_trial_the_loader_did_not_start():
    # The record says slot a runs version 2 on trial, but the loader could not start it
    # (e.g. ENOSPC writing the record): this code, the factory image, is running.
    fs = _fs()
    _trial_of(fs, "a", BUNDLE_VERSION + 1)
    assert otacheck.running_slot() is None
    u, logs = _updater(fs)
    u.start()
    assert not u.trial and u.stray, u.state
    assert u.state["state"] == "failed" and "did not start it" in u.state["reason"]
    assert otaboot.read(fs)["state"] == "testing"


def test_a_request_for_a_version_refused_before_is_not_acted_on():
    fs = _fs()
    otaboot.note(fs, {"state": "failed"}, bad_version=BUNDLE_VERSION + 1)
    u, _ = _updater(fs)
    req = {"version": BUNDLE_VERSION + 1, "manifest_sha256": SHA, "downgrade": False}
    assert not u._wanted(req)
    assert u.state["refused"] and "refused on this device before" in u.state["reason"]
    # A version below the floor, even with downgrade, is refused without a download.
    rec = otaboot.read(fs)
    rec["floor"] = BUNDLE_VERSION + 5
    otaboot.write(fs, rec)
    req = {"version": BUNDLE_VERSION + 3, "manifest_sha256": SHA, "downgrade": True}
    assert not u._wanted(req)
    assert "security floor" in u.state["reason"], u.state
    assert json.dumps(u.state)


def test_the_keys_of_the_last_confirmed_release_replace_the_provisioned_ones():
    fs = _fs()
    u, _ = _updater(fs)
    assert u.keys(otaboot.read(fs)) == [KEY]
    other = "04" + "22" * 64
    _trial_of(fs, "a", BUNDLE_VERSION + 1, keys=[KEY, other])
    assert u.keys(otaboot.read(fs)) == [KEY]  # not before the confirm
    otaboot.confirm(fs)
    assert u.keys(otaboot.read(fs)) == [KEY, other]


def test_a_deploy_commit_cut_short_is_completed_at_the_next_boot():
    # tools/deploy.py stages its files and moves them with finish_deploy (its commit, and
    # the loader at every boot): a copy cut short moves nothing, a commit cut short completes.
    import os

    root = fresh_image("deploy")  # used as a directory: the board's root
    stage = root + "/deploy.new"
    news = {"/firmware/app.mpy": b"new app", "/lib/mqtt/client.mpy": b"new client",
            "/config.json": b'{"device_id": "d"}'}
    for d in ("", "/firmware", "/deploy.new", "/deploy.new/firmware", "/deploy.new/lib",
              "/deploy.new/lib/mqtt", "/lib", "/lib/mqtt"):
        os.mkdir(root + d)
        CREATED.append(root + d)
    with open(root + "/firmware/app.mpy", "wb") as f:
        f.write(b"old app")
    for p, data in news.items():
        with open(stage + p, "wb") as f:
            f.write(data)
        CREATED.append(root + p)
    assert otaboot.finish_deploy(stage, root) == 0  # no commit began: the old code stays
    with open(root + "/firmware/app.mpy", "rb") as f:
        assert f.read() == b"old app"
    with open(stage + "/.commit", "w"):
        pass
    os.rename(stage + "/config.json", root + "/config.json")  # moved before the power went
    assert otaboot.finish_deploy(stage, root) == 2
    for p, data in news.items():
        with open(root + p, "rb") as f:
            assert f.read() == data
    assert "deploy.new" not in os.listdir(root)
    CREATED.remove(root + "/deploy.new")
    for d in ("/deploy.new/firmware", "/deploy.new/lib", "/deploy.new/lib/mqtt"):
        CREATED.remove(root + d)


def test_the_loader_moves_an_earlier_versions_queue_out_of_the_packages_way():
    # /outbox at the root of a board's flash shadowed the package outbox (sys.path starts
    # with the root); the queue lives in /outbox.d now and the loader moves an old one.
    fs = _fs()
    fs.mkdir("/outbox")
    with fs.open("/outbox/00000001.q", "wb") as f:
        f.write(b"records")
    otaboot._move_queue(fs)
    assert [e[0] for e in fs.ilistdir("/outbox.d")] == ["00000001.q"]
    assert "outbox" not in [e[0] for e in fs.ilistdir("/")]
    otaboot._move_queue(fs)  # nothing to move: nothing happens
    assert [e[0] for e in fs.ilistdir("/outbox.d")] == ["00000001.q"]
