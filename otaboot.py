# Boot control for over-the-air updates: part of the loader (main.py), never updated over
# the air. Which application slot runs (A, B, or the factory image: the firmware frozen into
# the build, or copied to the flash by deploy), whether a new slot is on trial, and the
# rollback when a trial keeps failing. One small JSON record, written atomically; the
# application (firmware/ota.py) changes it through the functions here, so there is one
# writer of its format.
import json
import os
import sys

PATH = "/ota.json"
SLOTS = ("a", "b")
# Boots a new slot gets to confirm itself: a crash, a watchdog reset or a power cut each
# use one; after that the previous slot runs again.
TRIES = 3


class RootFs:
    """A board's mounted root filesystem with the methods of a VfsLfs2 object."""

    def open(self, path, mode="r"):
        return open(path, mode)

    def remove(self, path):
        os.remove(path)

    def rename(self, old, new):
        os.rename(old, new)

    def stat(self, path):
        return os.stat(path)

    def ilistdir(self, path="/"):
        return os.ilistdir(path)

    def mkdir(self, path):
        os.mkdir(path)

    def rmdir(self, path):
        os.rmdir(path)

    def statvfs(self, path):
        return os.statvfs(path)


def slot_dir(slot):
    """A slot's directory, from the root of the flash."""
    return "/ota/" + slot


def read(fs):
    """The record, or the factory image's one when there is none (or it is unreadable)."""
    try:
        with fs.open(PATH, "r") as f:
            d = json.loads(f.read())
        if isinstance(d, dict) and d.get("active") in (None,) + SLOTS:
            return d
    except (OSError, ValueError):
        pass
    return {"active": None, "state": "confirmed", "tries": 0}


def write(fs, rec):
    # littlefs renames atomically: a power cut leaves the old record or the new one.
    tmp = PATH + ".tmp"
    with fs.open(tmp, "w") as f:
        f.write(json.dumps(rec))
    fs.rename(tmp, PATH)


def complete(fs, slot):
    """A slot the loader may run: its `ok` mark is there, written after every file of it was
    checked from flash (firmware/ota.py) and removed before anything in it changes."""
    try:
        fs.stat(slot_dir(slot) + "/ok")
        return True
    except OSError:
        return False


def _roll_back(rec, reason):
    rec["result"] = {"state": "rolled_back", "version": rec.get("version"),
                     "name": rec.get("name"), "reason": reason}
    rec["bad"] = (rec.get("bad") or [])[-3:] + [rec.get("sha")]
    rec["active"] = rec.get("prev")
    rec["version"] = rec.get("prev_version")
    rec["name"] = rec.get("prev_name")
    rec["sha"] = rec.get("prev_sha")
    rec["prev"] = None
    rec["state"] = "confirmed"
    rec["tries"] = 0
    return rec


def boot(fs, tries=TRIES):
    """Once per boot, before the application is imported: the slot to run (None: the factory
    image). A slot on trial gets `tries` boots to confirm itself, then the previous one runs
    again; a slot whose files are gone falls back the same way."""
    rec = read(fs)
    slot = rec.get("active")
    if slot is not None and not complete(fs, slot):
        _roll_back(rec, "slot %s is incomplete" % slot)
        write(fs, rec)
    elif rec.get("state") == "testing":
        if rec.get("tries", 0) >= tries:
            _roll_back(rec, "not confirmed after %d boots (crash, watchdog reset or power "
                            "cut)" % rec["tries"])
        else:
            rec["tries"] = rec.get("tries", 0) + 1
        write(fs, rec)
    return rec.get("active")


# ---- the application's side -----------------------------------------------------------

def switch(fs, slot, version, name, sha):
    """Run `slot` (verified) from the next boot on, on trial; the running one is kept."""
    rec = read(fs)
    rec["prev"] = rec.get("active")
    rec["prev_version"] = rec.get("version")
    rec["prev_name"] = rec.get("name")
    rec["prev_sha"] = rec.get("sha")
    rec.update(active=slot, version=version, name=name, sha=sha, state="testing", tries=0,
               result=None)
    write(fs, rec)


def confirm(fs):
    rec = read(fs)
    rec["state"] = "confirmed"
    rec["tries"] = 0
    rec["result"] = {"state": "confirmed", "version": rec.get("version"),
                     "name": rec.get("name"), "reason": None}
    write(fs, rec)
    return rec


def roll_back(fs, reason):
    """The running trial slot gave up on itself: the previous one runs from the next boot."""
    write(fs, _roll_back(read(fs), reason))


def note(fs, result, bad_sha=None):
    """Keep the outcome of an update that never switched (refused, failed) across boots,
    and the manifest not to try again."""
    rec = read(fs)
    rec["result"] = result
    if bad_sha:
        rec["bad"] = (rec.get("bad") or [])[-3:] + [bad_sha]
    write(fs, rec)


def load():
    """The loader: the active slot ahead of everything on sys.path. Returns what the board
    layer needs of it ({image path: (bdev, fs)} on the Unix port, else None). Any trouble
    here runs the factory image: the loader must never be why a board does not boot."""
    opened = None
    try:
        if sys.platform == "linux":
            import unixflash

            opened = unixflash.mount_single(sys.argv[1:])
            if not opened:
                return opened
            root = unixflash.MOUNT
            fs = list(opened.values())[0][1]
        else:
            root = ""
            fs = RootFs()
        slot = boot(fs)
        if slot is not None:
            d = root + slot_dir(slot)
            sys.path.insert(0, d + "/lib")
            sys.path.insert(0, d)
    except Exception as e:  # noqa: BLE001
        print("E loader: %r; running the factory image" % (e,))
    return opened
