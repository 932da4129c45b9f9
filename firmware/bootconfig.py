# Bootstrap config: the few settings a device needs before it can reach anything (identity,
# broker, Wi-Fi, TLS paths, topic prefix), read from /config.json on its flash and checked
# whole, so a bad file is one clear error instead of a crash somewhere later.
import json

from firmware.twin import check_text
from otaboot import key_ok

PATH = "/config.json"
MAX_BYTES = 4096

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


class ConfigError(ValueError):
    # A ValueError: the app drops this module after the boot, and a device still reading
    # its config may then meet a fresh copy of this class.
    pass


def _check_id(what, s, max_len=64):
    if not isinstance(s, str) or not 0 < len(s) <= max_len:
        raise ConfigError("%s must be a string of 1..%d characters" % (what, max_len))
    for c in s:
        if c not in _ID_CHARS:
            # No ".": RabbitMQ's MQTT plugin maps it to "/" on delivery, so device a.b
            # would get devices/a/b/... and ignore it; ids must work on every broker.
            raise ConfigError("%s %r has a character outside [A-Za-z0-9-_]%s" % (
                what, s, " ('.' is not portable across brokers: RabbitMQ turns it into '/')"
                if c == "." else ""))
    return s


def _num(d, key, default, lo, hi, kind=int):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise ConfigError("%s must be %s" % (key, "a number" if kind is float else "an integer"))
    if not lo <= v <= hi:
        raise ConfigError("%s must be in %s..%s" % (key, lo, hi))
    return v


def _str(d, key, default=None):
    v = d.get(key, default)
    if v is not None and not isinstance(v, str):
        raise ConfigError("%s must be a string" % key)
    return v


def validate(doc):
    """Return a normalised config dict or raise ConfigError naming the first bad field."""
    if not isinstance(doc, dict):
        raise ConfigError("top level must be a JSON object")
    cfg = {"device_id": _check_id("device_id", doc.get("device_id"))}
    prefix = doc.get("prefix", "")
    # Printable ASCII: MicroPython keeps overlong bytes in strings (an overlong "+" would
    # pass a wildcard check), and a topic that is not UTF-8 makes the broker drop us.
    if not isinstance(prefix, str) or [c for c in prefix if c in "+#" or not " " <= c <= "~"]:
        raise ConfigError("prefix must be printable ASCII without the MQTT wildcards + #")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    cfg["prefix"] = prefix
    b = doc.get("broker")
    # One endpoint, or a list in priority order (README "Broker failover").
    eps = b if isinstance(b, list) else [b]
    if not 0 < len(eps) <= MAX_ENDPOINTS or [e for e in eps if not isinstance(e, dict)]:
        raise ConfigError("broker must be an object with host and port, or a list of 1..%d "
                          "such objects in priority order" % MAX_ENDPOINTS)
    b = eps[0]
    broker = {
        "keepalive": _num(b, "keepalive", 60, 2, 65535),
        # Every network step (TCP connect, TLS handshake, CONNACK) gets this many seconds.
        "timeout": _num(b, "timeout", 10, 1, 120, float),
        "window": _num(b, "window", 16, 1, 256),
        "max_frame": _num(b, "max_frame", 4096, 256, 65536),
        "reconnect": _reconnect(b.get("reconnect", {})),
        # MQTT 5: how long the broker keeps our session once we are gone (a week: a
        # retired device is forgotten instead of queued for forever), and how long it waits
        # before publishing our last will (a reconnect within it makes no false "offline").
        "session_expiry_s": _num(b, "session_expiry_s", 604800, 0, 1073741823),
        "will_delay_s": _num(b, "will_delay_s", 30, 0, 86400),
    }
    endpoints = []
    for i, e in enumerate(eps):
        name = "broker" if len(eps) == 1 else "broker[%d]" % i
        if i:
            for k in SESSION_KEYS:
                if k in e:
                    raise ConfigError("%s.%s: session settings go in the first endpoint "
                                      "only" % (name, k))
        endpoints.append(_endpoint(name, e, endpoints[0] if endpoints else None))
    # The first endpoint's keys stay where single-broker code reads them.
    broker.update(endpoints[0])
    broker["endpoints"] = endpoints
    cfg["broker"] = broker
    cfg["failover"] = _section(doc.get("failover", {}), "failover", FAILOVER)
    wifi = doc.get("wifi", [])
    if not isinstance(wifi, list):
        raise ConfigError("wifi must be a list of {ssid, password}")
    nets = []
    for n in wifi:
        if not isinstance(n, dict) or not isinstance(n.get("ssid"), str):
            raise ConfigError("each wifi entry needs an ssid string")
        nets.append((n["ssid"], _str(n, "password", "")))
    cfg["wifi"] = nets
    groups = doc.get("groups", [])
    if not isinstance(groups, list):
        raise ConfigError("groups must be a list")
    cfg["groups"] = [_check_id("group", g) for g in groups]
    cfg["telemetry_interval"] = _num(doc, "telemetry_interval", 60, 0.05, 86400, float)
    cfg["outbox"] = _outbox(doc.get("outbox", {}))
    # Seconds between safety-net config refreshes (README "Config twin"); desired layers
    # may not go below 60 s, the bootstrap config may (tests scale it down).
    cfg["refresh_interval"] = _num(doc, "refresh_interval", 21600, 1, 604800, float)
    cfg["health_interval"] = _num(doc, "health_interval", 300, 0.5, 86400, float)
    # The hardware watchdog's timeout (clamped to what the chip allows: 8.3 s on RP2040).
    cfg["watchdog_ms"] = _num(doc, "watchdog_ms", 8000, 1000, 60000)
    cfg["safe_mode"] = _section(doc.get("safe_mode", {}), "safe_mode", SAFE_MODE)
    ntp = doc.get("ntp", {})
    cfg["ntp"] = _section(ntp, "ntp", NTP, ("servers",))
    servers = ntp.get("servers", ["pool.ntp.org"])
    if not isinstance(servers, list) or not all(isinstance(x, str) and x for x in servers):
        raise ConfigError("ntp.servers must be a list of host names")
    cfg["ntp"]["servers"] = servers
    cfg["ota"] = _ota(doc.get("ota", {}))
    cfg["power"] = _power(doc.get("power", {}))
    # "baseline" mimics the common blocking client, for storm comparisons only (README).
    cfg["profile"] = _str(doc, "profile", "standard")
    if cfg["profile"] not in ("standard", "baseline"):
        raise ConfigError("profile must be standard or baseline")
    return cfg


def _endpoint(name, e, first):
    """One broker endpoint: host, port, credentials, TLS. A later endpoint takes what it
    leaves out from the first (credentials and TLS are usually shared)."""
    first = first or {}
    ep = {
        "host": _str(e, "host"),
        "port": _num(e, "port", first.get("port", 1883), 1, 65535),
        "user": _str(e, "user", first.get("user")),
        "password": _str(e, "password", first.get("password")),
        # "auto": 5, and 3.1.1 for a broker that does not speak it (remembered).
        "protocol": "5" if e.get("protocol") == 5 else _str(e, "protocol",
                                                             first.get("protocol", "auto")),
    }
    if not ep["host"]:
        raise ConfigError("%s.host is required" % name)
    if ep["protocol"] not in PROTOCOLS:
        raise ConfigError("%s.protocol must be auto, 5 or 3.1.1" % name)
    if "tls" not in e:
        if first.get("tls"):
            # The files, not the name: a server_hostname names the first broker, and this
            # one must be verified against its own host.
            ep["tls"] = dict(first["tls"], server_hostname=None)
        return ep
    tls = e["tls"]
    if tls is None:
        return ep  # this one without TLS, although the first has it
    if not isinstance(tls, dict):
        raise ConfigError("%s.tls must be an object" % name)
    t = {
        "ca": _str(tls, "ca"),
        "cert": _str(tls, "cert"),
        "key": _str(tls, "key"),
        "server_hostname": _str(tls, "server_hostname"),
    }
    # Verification is not optional: without a CA there is nothing to verify against,
    # and a silent unverified connection is what TLS is there to prevent.
    if not t["ca"]:
        raise ConfigError("%s.tls.ca (CA certificate file) is required" % name)
    if bool(t["cert"]) != bool(t["key"]):
        raise ConfigError("%s.tls.cert and %s.tls.key go together" % (name, name))
    ep["tls"] = t
    return ep


def _outbox(o):
    """outbox: where telemetry waits for its PUBACK (lib/outbox, README "Offline queue")."""
    if not isinstance(o, dict):
        raise ConfigError("outbox must be an object")
    for k in o:
        if k not in ("ram_bytes", "flash_bytes", "policy", "overflow", "spill_ms"):
            raise ConfigError("outbox.%s is not a setting" % k)
    out = {
        "ram_bytes": _num(o, "ram_bytes", 4096, 1024, 262144),
        "flash_bytes": _num(o, "flash_bytes", 262144, 0, 16777216),
        "spill_ms": _num(o, "spill_ms", 1000, 100, 600000),
        "policy": _str(o, "policy", "offline"),
        "overflow": _str(o, "overflow", "oldest"),
    }
    if out["policy"] not in ("offline", "always"):
        raise ConfigError("outbox.policy must be offline or always")
    if out["overflow"] not in ("oldest", "newest"):
        raise ConfigError("outbox.overflow must be oldest or newest")
    return out


# Over-the-air updates (README "Updates"): the seconds a new version gets to confirm itself,
# how much longer a boot of it may run unconfirmed before the loader's deadline resets the
# board (a release whose own update code does nothing), the free flash left after a
# download, and the public keys (uncompressed P-256 points, hex) whose signatures it
# trusts: up to two, so a key can be rotated. No key: no updates.
OTA = {"confirm_s": (300, 5, 86400), "deadline_margin_s": (300, 1, 86400),
       "flash_reserve": (65536, 0, 16777216)}


def _ota(o):
    out = _section(o, "ota", OTA, ("keys",))
    keys = o.get("keys", [])
    if not isinstance(keys, list) or len(keys) > 2:
        raise ConfigError("ota.keys must be a list of at most two public keys")
    for k in keys:
        if not key_ok(k):
            raise ConfigError("ota.keys: each an uncompressed P-256 point, 130 lowercase hex "
                              "digits starting 04 (tools/bundle.py keygen)")
    out["keys"] = keys
    return out


# Broker failover (README "Broker failover"): move to the next endpoint after
# `after_attempts` failed attempts in a row, or at the first failed one after `after_s` s of
# failing ones, whichever comes first; on a secondary, check every `probe_s` (jittered) whether the primary answers, and
# once it does, return at a random moment within `failback_window_s`. With the default
# backoff a broker down for 5 minutes sees at most 13 attempts from a device: neither
# default is reached, so a restart never moves the fleet.
FAILOVER = {
    "after_attempts": (16, 1, 1000),
    "after_s": (600.0, 1, 86400),
    "probe_s": (300.0, 1, 86400),
    "failback_window_s": (600.0, 0, 86400),
}
MAX_ENDPOINTS = 4
# Settings of the session, not of an endpoint: the first endpoint's hold for all.
SESSION_KEYS = ("keepalive", "timeout", "window", "max_frame", "reconnect",
                "session_expiry_s", "will_delay_s")
PROTOCOLS = ("auto", "5", "3.1.1")


# name: (default, low, high). Seconds except flap_limit (a count).
RECONNECT = {
    "base": (1.0, 0.05, 60),
    "cap": (120.0, 1, 3600),
    "first_window": (5.0, 0, 3600),
    "stable_s": (30.0, 1, 3600),
    "busy_floor": (10.0, 0, 3600),
    "hard_floor": (60.0, 0.5, 7200),
    "hard_cap": (1800.0, 1, 86400),
    "flap_s": (10.0, 0, 3600),
    "flap_limit": (3, 1, 100),
}


# Boot-loop safe mode: after `boots` boots in a row that each ended (crash, watchdog, power)
# before `short_boot_s`, the next runs network, MQTT, config and commands only, until it has
# run `healthy_s`.
SAFE_MODE = {
    "boots": (5, 1, 1000),
    "short_boot_s": (60, 1, 86400),
    "healthy_s": (300, 1, 86400),
}

# Boards set their clock by SNTP at boot and every `interval` s (jittered per device).
NTP = {"interval": (3600, 1, 604800), "timeout_ms": (2000, 100, 30000)}


# Battery boards (README "Battery devices"): "duty" wakes every `wake_every_s`, delivers on
# every `send_every`th wake (and keeps the other wakes' readings), is asleep again within
# `awake_max_s` whatever happens, and stays awake `stay_awake_s` when the fleet asks.
POWER = {
    "wake_every_s": (300.0, 1, 86400),
    "send_every": (1, 1, 1000),
    "awake_max_s": (30.0, 2, 3600),
    "stay_awake_s": (0.0, 0, 86400),
}
POWER_MODES = ("always-on", "duty")


def _power(p):
    out = _section(p, "power", POWER, ("mode",))
    out["mode"] = _str(p, "mode", "always-on")
    if out["mode"] not in POWER_MODES:
        raise ConfigError("power.mode must be always-on or duty")
    return out


def _section(r, name, table, other=()):
    """An object of numeric settings, every key optional, unknown keys refused. A default
    that is an int makes the setting an integer; a float, a number."""
    if not isinstance(r, dict):
        raise ConfigError("%s must be an object" % name)
    for k in r:
        if k not in table and k not in other:
            raise ConfigError("%s.%s is not a setting" % (name, k))
    out = {}
    for k, (d, lo, hi) in table.items():
        v = _num(r, k, d, lo, hi, float if isinstance(d, float) else int)
        out[k] = float(v) if isinstance(d, float) else v
    return out


def _reconnect(r):
    """broker.reconnect: the backoff policy (see backoff.Backoff), every key optional, so an
    operator can widen the first window for a large fleet."""
    out = _section(r, "broker.reconnect", RECONNECT)
    if out["cap"] < out["base"] or out["hard_cap"] < out["hard_floor"]:
        raise ConfigError("broker.reconnect: a cap is below its base or floor")
    return out


def load(fs):
    """Read and validate the bootstrap config from the board's filesystem."""
    try:
        size = fs.stat(PATH)[6]
    except OSError:
        raise ConfigError("%s missing: provision the device (see README)" % PATH)
    if size > MAX_BYTES:
        raise ConfigError("%s larger than %d bytes" % (PATH, MAX_BYTES))
    try:
        # Exactly the file's size: read(MAX_BYTES + 1) took a 4 KB block at every boot,
        # the moment the heap is most fragmented.
        with fs.open(PATH, "r") as f:
            text = f.read(size)
    except OSError as e:
        raise ConfigError("%s unreadable: %r" % (PATH, e))
    except UnicodeError:  # the text read checks UTF-8
        raise ConfigError("%s is not UTF-8" % PATH)
    try:
        check_text(text, MAX_BYTES, 8, False)  # nesting costs the parser heap: refused first
        doc = json.loads(text)
    except ValueError:
        raise ConfigError("%s is not valid JSON (or nested deeper than 8)" % PATH)
    return validate(doc)
