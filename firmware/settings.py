# The settings an operator may change through the desired-config layers (README "Config
# twin"): name, kind, default, limits, and whether a change applies live or at the next
# boot. Anything not declared here is reported as unknown and never applied.

NUM = "num"
INT = "int"
CHOICE = "choice"

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
    ("outbox.ram_bytes", INT, 8192, 1024, 262144, False),
    ("outbox.flash_bytes", INT, 262144, 0, 16777216, False),
)


def find(name):
    for s in SETTINGS:
        if s[0] == name:
            return s
    return None


def defaults():
    return {s[0]: s[2] for s in SETTINGS}


def check(name, value):
    """The value, normalised, or ValueError saying why it is not acceptable."""
    s = find(name)
    kind, lo, hi = s[1], s[3], s[4]
    if kind == CHOICE:
        if value not in lo:
            raise ValueError("%s must be one of %s" % (name, "|".join(lo)))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind == NUM else int):
        raise ValueError("%s must be %s" % (name, "a number" if kind == NUM else "an integer"))
    if not lo <= value <= hi:
        raise ValueError("%s must be in %s..%s" % (name, lo, hi))
    return value
