# The settings an operator may change through the desired-config layers (README "Config
# twin"): name, kind, default, limits, and whether a change applies live or at the next
# boot. Anything not declared here, or by the device's application (`extra`: its `app.*`
# settings, firmware/apphost.py), is reported as unknown and never applied.

NUM = "num"
INT = "int"
CHOICE = "choice"
# Application settings may also be "bool", and "str" (high: the longest length).
# A JSON object taken whole: a layer's object replaces a lower layer's, never merged key by
# key (an update request from a group must not mix with one from the device's own layer).
OBJ = "obj"

# (dotted name, kind, default, low or choices, high, live)
SETTINGS = (
    ("telemetry_interval", NUM, 60, 0.05, 86400, True),
    ("health_interval", NUM, 300, 5, 86400, True),
    ("log_level", CHOICE, "info", ("debug", "info", "warn", "error"), None, True),
    ("refresh_interval", NUM, 21600, 60, 604800, True),
    ("reconnect.base", NUM, 1, 0.05, 60, True),
    ("reconnect.cap", NUM, 120, 1, 3600, True),
    ("reconnect.first_window", NUM, 5, 0, 3600, True),
    ("outbox.policy", CHOICE, "offline", ("offline", "always"), None, False),
    ("outbox.ram_bytes", INT, 4096, 1024, 262144, False),
    ("outbox.flash_bytes", INT, 262144, 0, 16777216, False),
    # Battery boards (bootconfig.POWER): the others apply from the next wake on; the mode at
    # the next boot (reported as pending_reboot until then).
    ("power.mode", CHOICE, "always-on", ("always-on", "duty"), None, False),
    ("power.wake_every_s", NUM, 300, 1, 86400, True),
    ("power.send_every", INT, 1, 1, 1000, True),
    ("power.awake_max_s", NUM, 30, 2, 3600, True),
    ("power.stay_awake_s", NUM, 0, 0, 86400, True),
    # An over-the-air update request (README "Updates"); checked by check_ota.
    ("ota", OBJ, None, None, None, True),
)

_HEX = "0123456789abcdef"


def check_ota(v):
    """{"version", "url", "manifest_sha256", "window_s", optional "downgrade", "reboot"}:
    the request as the device will act on it, or ValueError."""
    if not isinstance(v, dict):
        raise ValueError("ota must be an object")
    for k in v:
        if k not in ("version", "url", "manifest_sha256", "window_s", "downgrade", "reboot"):
            raise ValueError("ota.%s is not a field of an update request" % k)
    ver = v.get("version")
    if isinstance(ver, bool) or not isinstance(ver, int) or not 1 <= ver < 1 << 30:
        raise ValueError("ota.version must be an integer from 1")
    url = v.get("url")
    if not isinstance(url, str) or len(url) > 200 or not (
            url.startswith("http://") or url.startswith("https://")):
        raise ValueError("ota.url must be an http:// or https:// URL of at most 200 characters")
    sha = v.get("manifest_sha256")
    if not isinstance(sha, str) or len(sha) != 64 or [c for c in sha if c not in _HEX]:
        raise ValueError("ota.manifest_sha256 must be 64 lowercase hex digits")
    w = v.get("window_s", 3600)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 604800:
        raise ValueError("ota.window_s must be in 0..604800")
    if not isinstance(v.get("downgrade", False), bool):
        raise ValueError("ota.downgrade must be true or false")
    if v.get("reboot", "window") not in ("window", "now"):
        raise ValueError("ota.reboot must be window|now")
    return {"version": ver, "url": url, "manifest_sha256": sha, "window_s": w,
            "downgrade": v.get("downgrade", False), "reboot": v.get("reboot", "window")}



# `extra`, the application's settings (() without one), is a required argument: a default
# would cost every device a tuple of defaults per function, app or not.
def find(name, extra):
    for s in SETTINGS:
        if s[0] == name:
            return s
    for s in extra:
        if s[0] == name:
            return s
    return None


def defaults(extra):
    d = {s[0]: s[2] for s in SETTINGS}
    for s in extra:
        d[s[0]] = s[2]
    return d


def check(name, value, extra):
    """The value, normalised, or ValueError saying why it is not acceptable."""
    s = find(name, extra)
    kind, lo, hi = s[1], s[3], s[4]
    if kind == OBJ:
        return None if value is None else check_ota(value)
    if kind == CHOICE:
        if value not in lo:
            raise ValueError("%s must be one of %s" % (name, "|".join(lo)))
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("%s must be true or false" % name)
        return value
    if kind == "str":
        if not isinstance(value, str) or len(value) > hi:
            raise ValueError("%s must be a string of at most %d characters" % (name, hi))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind == NUM else int):
        raise ValueError("%s must be %s" % (name, "a number" if kind == NUM else "an integer"))
    # An application's number may leave out either limit.
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError("%s must be in %s..%s" % (name, lo, hi))
    return value
