# Boot control for over-the-air updates: part of the loader (boot.py, main.py), never updated
# over the air. Which application slot runs (A, B, or the factory image: the firmware frozen
# into the build, or copied to the flash by deploy), whether a new slot is on trial, the
# deadline a trial gets in code no update can change, the rollback when a trial keeps
# failing, the security floor and the update keys a confirmed release leaves behind, and the
# rule for what a bundle may install. One small JSON record, written atomically; the
# application (firmware/ota.py) changes it through the functions here, so there is one
# writer of its format. tools/bundle.py imports this file too (CPython), for bad_entry().
import json
import os
import sys

PATH = "/ota.json"
SLOTS = ("a", "b")
# Boots a new slot gets to confirm itself: a crash, a watchdog reset, a power cut or the
# trial deadline each use one; after that the previous slot runs again.
TRIES = 3
# Versions kept as refused for good (a signed release that crashed, rolled back or was
# refused for its content). Only a verified release can add one, so requests cannot flush
# them; when full, the lowest goes (a request below the floor is refused anyway).
REFUSED_MAX = 8
# Manifests whose signature did not verify, by SHA-256: not downloaded again while the same
# request stands. Anyone can add one, so these are few and may be pushed out.
BAD_SHA_MAX = 4
# The longest watchdog timeout each chip allows: boot.py arms it before anything can hang.
WDT_MAX_MS = {"esp32": 60000, "rp2": 8388}
# Top-level module names of the loader. A slot's lib/ comes ahead of them on sys.path, so a
# bundle file with one of these names would replace the loader: no bundle may have one.
LOADER = ("otaboot", "unixflash", "unixboot", "main", "boot")
# What a bundle installs: bytecode of the firmware package, of its libraries and of the
# user's application package (README "Writing your application").
TOPS = ("firmware", "lib", "app")
_HEX = "0123456789abcdef"

# The trial deadline armed at this boot (loader state: one board per chip, one loader).
_deadline = None


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


def inactive(rec):
    """The slot an update goes into: the one not running."""
    return "b" if rec.get("active") == "a" else "a"


def bad_entry(f):
    """Why a manifest's file entry [path, size, sha256] may not be installed, or None. The
    one rule of the device (firmware/ota.py) and of tools/bundle.py: .mpy files under
    firmware/ and lib/ only, no path tricks, nothing named like the loader."""
    if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)
            and type(f[1]) is int and isinstance(f[2], str)):
        return "not [path, size, sha256]"
    path, size, sha = f
    if size < 0:
        return "%s: a negative size" % path
    if len(sha) != 64 or [c for c in sha if c not in _HEX]:
        return "%s: the sha256 is not 64 lowercase hex digits" % path
    parts = path.split("/")
    if (len(path) > 120 or "\\" in path or len(parts) < 2
            or [p for p in parts if p in ("", ".", "..")]):
        return "%r: not a plain relative path" % path
    if parts[0] not in TOPS or not path.endswith(".mpy"):
        return "%s: only .mpy files under firmware/, lib/ and app/" % path
    name = parts[1].split(".")[0]
    if parts[0] == "lib" and (name in LOADER or name in ("firmware", "app")):
        return "%s: it would replace the loader's %s" % (path, name)
    return None


def key_ok(k):
    """An update key as devices hold it: an uncompressed P-256 point, 130 lowercase hex."""
    return (isinstance(k, str) and len(k) == 130 and k.startswith("04")
            and not [c for c in k if c not in _HEX])


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


def floor(rec):
    """The lowest version this device may install (raised by each confirmed release)."""
    return rec.get("floor") or 1


def refused(rec, version):
    """Whether `version` was refused for good on this device."""
    return version in (rec.get("refused") or ())


def _refuse_version(rec, version):
    if type(version) is not int or refused(rec, version):
        return
    vs = sorted((rec.get("refused") or []) + [version])
    rec["refused"] = vs[-REFUSED_MAX:]


def _roll_back(fs, rec, reason):
    rec["result"] = {"state": "rolled_back", "version": rec.get("version"),
                     "name": rec.get("name"), "reason": reason}
    _refuse_version(rec, rec.get("version"))
    prev = rec.get("prev")
    if prev is not None and not complete(fs, prev):
        # The slot to go back to is gone or half-written (an update into it began): the
        # factory image is always there.
        prev = None
        rec["prev_version"] = rec["prev_name"] = rec["prev_sha"] = None
    rec["active"] = prev
    rec["version"] = rec.get("prev_version")
    rec["name"] = rec.get("prev_name")
    rec["sha"] = rec.get("prev_sha")
    rec["prev"] = None
    rec["state"] = "confirmed"
    rec["tries"] = 0
    for k in ("trial", "deadline_s"):
        rec.pop(k, None)
    return rec


def boot(fs, tries=TRIES):
    """Once per boot, before the application is imported: the slot to run (None: the factory
    image). A slot on trial gets `tries` boots to confirm itself, then the previous one runs
    again; a slot whose files are gone falls back the same way."""
    rec = read(fs)
    slot = rec.get("active")
    if slot is not None and not complete(fs, slot):
        _roll_back(fs, rec, "slot %s is incomplete" % slot)
        write(fs, rec)
    elif rec.get("state") == "testing":
        if rec.get("tries", 0) >= tries:
            _roll_back(fs, rec, "not confirmed after %d boots (crash, watchdog reset, power "
                                "cut or trial deadline)" % rec["tries"])
        else:
            rec["tries"] = rec.get("tries", 0) + 1
        write(fs, rec)
    return rec.get("active")


# ---- the trial deadline: a timer the application cannot move ----------------------------

def _runner(text):
    """The Unix port's stand-in for a timer: the runner (testbed/devices.py) that plays the
    board's watchdog plays its timers too, over the same UDP address (--wdt HOST:PORT)."""
    import socket

    argv = sys.argv
    for i in range(len(argv) - 1):
        if argv[i] == "--wdt":
            host, _, port = argv[i + 1].rpartition(":")
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(text, socket.getaddrinfo(host, int(port))[0][-1])
            finally:
                s.close()
            return True
    return False


def _reset_in(ms):
    """A one-shot timer that resets the board in `ms`, or None where there is none. A soft
    reset (the host's mpremote) stops it, as it stops every timer."""
    if sys.platform == "linux":
        return _runner("deadline %d" % ms) or None
    import machine

    # A soft one-shot timer: its callback runs between bytecodes, where a reset is safe.
    # ESP32: a hardware timer, soft by default; RP2: a virtual one, hard unless told.
    reset = lambda _: machine.reset()  # noqa: E731
    if sys.platform == "esp32":
        t = machine.Timer(0)
        t.init(mode=machine.Timer.ONE_SHOT, period=ms, callback=reset)
    else:
        t = machine.Timer()
        t.init(mode=machine.Timer.ONE_SHOT, period=ms, callback=reset, hard=False)
    return t


def arm_deadline(s):
    """Reset the board in `s` seconds unless confirm() comes first: a release whose own
    update code never confirms nor rolls back still uses up its boots."""
    global _deadline
    _deadline = _reset_in(int(s * 1000))
    return _deadline is not None


def disarm_deadline():
    global _deadline
    t, _deadline = _deadline, None
    if t is None:
        return
    if sys.platform == "linux":
        _runner("deadline 0")
    else:
        t.deinit()


def deadline_armed():
    return _deadline is not None


# ---- the application's side -----------------------------------------------------------

def switch(fs, slot, version, name, sha, deadline_s, trial=None):
    """Run `slot` (verified) from the next boot on, on trial for at most `deadline_s` per
    boot; the running one is kept. `trial`: what the verified manifest leaves behind once
    confirmed ({"floor": N, "keys": [...]})."""
    rec = read(fs)
    rec["prev"] = rec.get("active")
    rec["prev_version"] = rec.get("version")
    rec["prev_name"] = rec.get("name")
    rec["prev_sha"] = rec.get("sha")
    rec.update(active=slot, version=version, name=name, sha=sha, state="testing", tries=0,
               result=None, deadline_s=deadline_s, trial=trial or {})
    write(fs, rec)


def confirm(fs):
    """The trial slot proved itself: it stays, its floor and keys take effect, and the
    deadline is off."""
    rec = read(fs)
    trial = rec.pop("trial", None) or {}
    rec.pop("deadline_s", None)
    rec["state"] = "confirmed"
    rec["tries"] = 0
    if trial.get("floor", 0) > floor(rec):
        rec["floor"] = trial["floor"]
    if trial.get("keys"):
        rec["keys"] = trial["keys"]
    rec["result"] = {"state": "confirmed", "version": rec.get("version"),
                     "name": rec.get("name"), "reason": None}
    write(fs, rec)
    disarm_deadline()
    return rec


def roll_back(fs, reason):
    """The running trial slot gave up on itself: the previous one runs from the next boot."""
    write(fs, _roll_back(fs, read(fs), reason))


def note(fs, result, bad_sha=None, bad_version=None):
    """Keep the outcome of an update that never switched (refused, failed) across boots,
    and what not to try again: a manifest by its sha256 (its signature failed) or a
    verified release by its version."""
    rec = read(fs)
    rec["result"] = result
    if bad_sha:
        rec["bad"] = (rec.get("bad") or [])[1 - BAD_SHA_MAX:] + [bad_sha]
    _refuse_version(rec, bad_version)
    write(fs, rec)


# ---- the loader -------------------------------------------------------------------------

def _forget_shadowed(d):
    """Drop every module the slot at `d` provides that is loaded already (boot.py's imports,
    a frozen copy): importing it again then finds the slot's."""
    names = ["firmware", "app"]
    try:
        for e in os.ilistdir(d + "/lib"):
            names.append(e[0].split(".")[0])
    except OSError:
        pass
    for m in list(sys.modules):
        if m.split(".")[0] in names:
            del sys.modules[m]


def _move_queue(fs):
    """Earlier versions kept the telemetry queue in /outbox, which at the root of a board's
    flash (first on sys.path) is taken for the package `outbox`: no firmware imported after
    it. Moved to where the queue lives now (lib/outbox/flashlog.py DIRECTORY) before
    anything imports it."""
    try:
        fs.rename("/outbox", "/outbox.d")
    except OSError:
        pass  # none (or both: then the newer one stays)


def load():
    """The loader: the active slot ahead of everything on sys.path, and a slot on trial
    under its deadline. Returns what the board layer needs of it ({image path: (bdev, fs)}
    on the Unix port, else None). Any trouble here runs the factory image: the loader must
    never be why a board does not boot (and the factory image never confirms a trial it is
    not: firmware/ota.py compares versions)."""
    opened = None
    try:
        if sys.platform == "linux":
            import unixflash

            opened = unixflash.mount_single(sys.argv[1:])
            if opened:
                root = unixflash.MOUNT
                fs = list(opened.values())[0][1]
            elif unixflash.ROOT in unixflash.flashes(sys.argv[1:]):
                root = ""
                fs = RootFs()
            else:
                return opened
        else:
            root = ""
            fs = RootFs()
        _move_queue(fs)
        slot = boot(fs)
        if slot is not None:
            d = root + slot_dir(slot)
            sys.path.insert(0, d + "/lib")
            sys.path.insert(0, d)
            _forget_shadowed(d)
            rec = read(fs)
            if rec.get("state") == "testing":
                s = rec.get("deadline_s") or 0
                if s > 0 and arm_deadline(s):
                    print("I loader: version %s on trial, boot %d of %d, deadline %d s"
                          % (rec.get("version"), rec.get("tries", 0), TRIES, s))
    except Exception as e:  # noqa: BLE001
        print("E loader: %r; running the factory image" % (e,))
        for i in range(len(sys.path) - 1, -1, -1):
            if "/ota/" in sys.path[i]:
                sys.path.pop(i)
    return opened


# ---- a deploy over USB (tools/deploy.py) ------------------------------------------------
# A watchdog once armed cannot be stopped, and it keeps running through the soft reset that
# starts every mpremote command: a deploy to a running board would be reset halfway (8.4 s
# on an RP2040). So a deploy writes HOLD and resets the board, which stops the watchdog;
# while HOLD is there boot.py arms none, and the first boot after the reset stays in the
# REPL, firmware not started, for the deploy's commands. The deploy's files go to STAGE and
# are moved into place by finish_deploy() once all are there, so a deploy cut short leaves
# the board with its old code and identity.
HOLD = "/deploy.hold"
STAGE = "/deploy.new"
# A hold nobody uses (the deploy died right after its reset) ends with a reset after this.
HOLD_MS = 600000


def finish_deploy(stage=STAGE, root=""):
    """Move a deploy's staged files into place (under `root`, the flash's root) once its
    commit began (stage/.commit is there); the deploy's own commit runs this
    (tools/deploy.py sends its source), and the loader runs it at every boot, so a commit
    cut short by a power loss completes. Returns how many files moved. Self-contained: it
    runs on a board whose loader is older."""
    import os

    try:
        os.stat(stage + "/.commit")
    except OSError:
        return 0
    moved = 0
    dirs = []
    todo = [""]
    while todo:
        rel = todo.pop()
        for e in list(os.ilistdir(stage + rel)):
            path = rel + "/" + e[0]
            if e[1] == 0x4000:
                todo.append(path)
                dirs.append(stage + path)
                try:
                    os.mkdir(root + path)
                except OSError:
                    pass  # there already
            elif path != "/.commit":
                os.rename(stage + path, root + path)  # replaces the old file at once
                moved += 1
    for d in reversed(dirs):
        os.rmdir(d)
    os.remove(stage + "/.commit")
    os.rmdir(stage)
    return moved


def _hold_state():
    try:
        with open(HOLD) as f:
            return f.read()
    except OSError:
        return None


def held():
    """main.py: whether a deploy holds the board (its firmware is then not started). The
    first boot after the deploy's reset holds; a hold found at any later boot that runs
    main.py is one the deploy never finished: it is removed and the board boots."""
    state = _hold_state()
    if state is None:
        return False
    if state == "new":
        with open(HOLD, "w") as f:
            f.write("held")
        _reset_in(HOLD_MS)
        print("I loader: held for a deploy (no watchdog, firmware not started)")
        return True
    os.remove(HOLD)
    print("W loader: a deploy did not finish; its hold is removed, the firmware starts")
    early_watchdog()
    return False


def early_watchdog():
    """boot.py: the watchdog at the chip's longest timeout before anything else can hang
    (the application sets the configured one), unless a deploy holds the board. On Unix the
    runner plays the watchdog."""
    ms = WDT_MAX_MS.get(sys.platform)
    if ms and _hold_state() is None:
        import machine

        machine.WDT(timeout=ms)
