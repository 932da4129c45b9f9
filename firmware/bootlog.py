# Boot history on flash: the boot number that tags every message (so consumers tell a restart
# from loss), why the previous boot ended and how long it ran, and the run of short boots that
# sends a crash-looping device into safe mode. One small JSON record, written atomically
# (temp file, then rename), a handful of times per boot.
import json

PATH = "/boot.json"

# What a board reports for the reset that started this boot. "soft" and "watchdog" can be
# ours: a reset the firmware asked for leaves its reason in the record first ("pending").
CAUSES = ("power-on", "hard", "watchdog", "soft", "crash", "deepsleep", "unknown")
# Short boots that end in these say nothing about the firmware: the power went (ESP32 and
# RP2 both report a brownout as power-on) or the board slept. They neither count towards
# safe mode nor end a run of short boots. Everything else can be a firmware fault: a
# watchdog reset (a hang), a crash we recorded, "hard" (an ESP32 panic, or a reset nobody
# recorded), "unknown".
NOT_OURS = ("power-on", "deepsleep")


def read(fs):
    try:
        with fs.open(PATH, "r") as f:
            d = json.loads(f.read())
        if isinstance(d, dict) and isinstance(d.get("boot"), int):
            return d
    except (OSError, ValueError):
        pass
    return {"boot": 0}


def write_atomic(fs, path, text):
    tmp = path + ".tmp"
    try:
        with fs.open(tmp, "w") as f:
            f.write(text)
    except OSError:
        # A full flash has no room for a new file, but an existing one can still be
        # rewritten, and littlefs commits a file's new content at close, whole or not at
        # all. Without this, a boot on a full flash could not count itself, and the next
        # one would take the same boot number: two messages under one (boot, seq).
        try:
            fs.remove(tmp)
        except OSError:
            pass
        with fs.open(path, "w") as f:
            f.write(text)
        return
    fs.rename(tmp, path)


class BootLog:
    """This boot's record. `start()` once per boot; `save()` when the uptime is worth
    keeping (the previous boot's uptime is only as fresh as its last save)."""

    def __init__(self, fs):
        self.fs = fs
        self.rec = None

    def start(self, hw_cause, safe_after):
        """Count this boot, settle why the last one ended, and decide safe mode: after
        `safe_after` boots in a row that ended before they were marked stable, power cuts
        not counted."""
        prev = read(self.fs)
        cause = hw_cause if hw_cause in CAUSES else "unknown"
        pending = prev.get("pending")
        # Power-on wins: the power went after we asked for a reset.
        if pending in CAUSES and cause != "power-on":
            cause = pending
        if prev["boot"] == 0 or prev.get("stable", True):
            streak = 0  # first boot, a healthy previous boot, or a record from before this field
        elif cause in NOT_OURS:
            streak = prev.get("streak", 0)  # a solar board browning out at dusk, five times
        else:
            streak = prev.get("streak", 0) + 1
        self.rec = {
            "boot": prev["boot"] + 1,
            "cause": cause,
            "prev_up_s": prev.get("up_s"),
            "streak": streak,
            "safe": streak >= safe_after,
            "up_s": 0,
            "stable": False,
            "pending": None,
        }
        self._write()
        return self.rec

    def save(self, up_s, stable=None, pending=None):
        r = self.rec
        r["up_s"] = up_s
        if stable is not None:
            r["stable"] = stable
        if pending is not None:
            r["pending"] = pending
        self._write()

    def _write(self):
        write_atomic(self.fs, PATH, json.dumps(self.rec))
