"""Hostile documents for the firmware's parsers, as hypothesis strategies (host-side).

Each strategy draws an Item: the bytes to feed, where they go (bootstrap config, a desired
config layer, a command), and what the firmware must do with them:
- "valid": accepted with exactly the meaning the generator gave them;
- "invalid": refused with the firmware's own error (ConfigError for the bootstrap config, a
  counted rejection in the twin or the command handler);
- "any": noise (random bytes, and JSON that MicroPython's lenient parser may read in its own
  way): either outcome, but never anything else (no crash, no MemoryError, no output a
  consumer cannot read).
Used by tests/host/test_hostile_input.py (in the Unix port, in batches) and its end-to-end
test on a running device. The rules encoded here are the firmware's: a desired document or a
command body is at most 2048 bytes, nested at most 4 deep, printable ASCII without \\u
escapes (MicroPython's json turns escaped surrogates and overlong bytes into strings that
are not UTF-8, which would then be echoed to consumers); device ids and group names are
1..64 of [A-Za-z0-9-_.]; the topic prefix is printable ASCII without + and #.
"""
import json
import math
import os
import sys

from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from firmware import settings  # noqa: E402

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))
COMMANDS = ("ping", "logs", "report", "refresh-config")  # not reboot: it ends the batch
DEVICE = "fz"  # the batch device's id and group (tests/mpy/hostile_batch.py)
GROUP = "model-x"
LAYER_TOPICS = {"all": "fleet/all/config/desired", GROUP: "fleet/%s/config/desired" % GROUP,
                "device": "devices/%s/config/desired" % DEVICE}
INITIAL = {"telemetry_interval": 3}  # the device layer the batch device starts each item with


class Raw(bytes):
    """Bytes put into a document verbatim: tokens JSON has not (NaN), escapes, bad UTF-8."""


class Item:
    def __init__(self, kind, topic, payload, label, expect=None, note=""):
        self.kind = kind  # boot | desired | cmd
        self.topic = topic
        self.payload = payload
        self.label = label  # valid | invalid | any
        self.expect = expect  # for valid items: what the firmware must make of them
        self.note = note  # what the generator did, for failure messages

    def __repr__(self):
        return "Item(%s %s %s %r %r)" % (self.kind, self.label, self.note, self.topic[:100],
                                           self.payload[:300])


def dump(v, ascii_=True):
    """JSON bytes, with Raw pieces verbatim."""
    if isinstance(v, Raw):
        return bytes(v)
    if isinstance(v, dict):
        return b"{" + b", ".join(dump(k, ascii_) + b": " + dump(x, ascii_) for k, x in v.items()) + b"}"
    if isinstance(v, list):
        return b"[" + b", ".join(dump(x, ascii_) for x in v) + b"]"
    return json.dumps(v, ensure_ascii=ascii_).encode()


def nest(flat):
    out = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


# ---- values --------------------------------------------------------------------------------

def _round(lo, hi):
    return st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, 3)).filter(
        lambda x: lo <= x <= hi)


# An update request as settings.check_ota gives it back (every field present).
OTA_VALID = st.fixed_dictionaries({
    "version": st.integers(1, 1 << 20),
    "url": st.sampled_from(["http://h/b/", "https://files.example/v2/", "http://10.0.0.1:8080/x"]),
    "manifest_sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "window_s": st.integers(0, 604800),
    "downgrade": st.booleans(),
    "reboot": st.sampled_from(["window", "now"]),
})


def valid_value(s):
    name, kind, default, lo, hi, live = s
    if kind == settings.OBJ:
        return st.one_of(st.none(), OTA_VALID)
    if kind == settings.CHOICE:
        return st.sampled_from(lo)
    if kind == settings.INT:
        return st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))
    return st.one_of(st.sampled_from([lo, hi]), st.integers(math.ceil(lo), int(hi)),
                     _round(lo, hi))


WRONG_TYPES = st.sampled_from(["5", "", True, False, None, [], [1], "1e3"])
NAN_TOKENS = st.sampled_from([Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"nan"),
                              Raw(b"inf"), Raw(b"undefined"), Raw(b"+1"), Raw(b".5"),
                              Raw(b"0x10"), Raw(b"'single'"), Raw(b"-"), Raw(b"1e5e5")])
# 1e999 parses (to inf), so it must fail the range check rather than the parser.
HUGE_NUMBERS = st.sampled_from([Raw(b"1e999"), Raw(b"-1e999"), Raw(b"1" + b"0" * 400),
                                10 ** 30, -10 ** 30, 2 ** 63, -2 ** 63 - 1])


def invalid_value(s):
    name, kind, default, lo, hi, live = s
    if kind == settings.OBJ:
        return st.one_of(
            WRONG_TYPES.filter(lambda x: x is not None),
            OTA_VALID.map(lambda d: dict(d, version=0)),
            OTA_VALID.map(lambda d: dict(d, url="ftp://h/b/")),
            OTA_VALID.map(lambda d: dict(d, manifest_sha256="A" * 64)),
            OTA_VALID.map(lambda d: dict(d, window_s=-1)),
            OTA_VALID.map(lambda d: dict(d, extra=1)))
    if kind == settings.CHOICE:
        return st.one_of(st.text(PRINTABLE, max_size=12).filter(lambda x: x not in lo),
                         st.sampled_from([x.upper() for x in lo]), WRONG_TYPES.filter(
                             lambda x: x not in lo), st.integers(), HUGE_NUMBERS)
    # A margin beyond the limits: MicroPython's float parser is not correctly rounded, so
    # 86400.00000000001 may come out as 86400.0 (the limit, accepted).
    outside = st.one_of(st.floats(max_value=lo - 0.001, allow_nan=False, allow_infinity=False),
                        st.floats(min_value=hi + 0.001, allow_nan=False,
                                  allow_infinity=False))
    bad = st.one_of(outside, WRONG_TYPES, HUGE_NUMBERS, st.just(-1))
    if kind == settings.INT:
        # Within the range but not an integer (2048.0 included: JSON says float).
        bad = st.one_of(bad, _round(lo, hi).filter(lambda x: x != int(x)),
                        st.integers(lo, hi).map(lambda x: Raw(b"%d.0" % x)))
    return bad.filter(lambda x: not (isinstance(x, (int, float)) and not isinstance(x, bool)
                                     and lo <= x <= hi and (kind != settings.INT
                                                            or isinstance(x, int))))


UNKNOWN_NAMES = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12).filter(
    lambda k: k != "version" and not settings.find(k, ())
    and not any(s[0].startswith(k + ".") for s in settings.SETTINGS))
# Unicode that must not pass: escaped surrogates (lone and paired: MicroPython makes each a
# 3-byte sequence), NUL escaped and raw, overlong and invalid bytes, RTL override, emoji,
# a BOM, an encoded surrogate. Each goes inside a JSON string.
BAD_UNICODE = st.sampled_from([
    b"\\ud800", b"\\udfff", b"\\ud83d\\ude00", b"\\u0000", b"\x00", b"\xc0\xaf", b"\xc0\xab",
    b"\xe0\x80\xaf", b"\xff", b"\xfe\xff", b"\xed\xa0\x80", b"\xe2\x80\xae", b"\\u202e",
    b"\xf0\x9f\x98\x80", b"\xef\xbb\xbf", b"\xc3\xa9", b"\\u00e9", b"\x01", b"\x1b[2J",
    b"\xf4\x90\x80\x80",
])


# ---- desired config layers -----------------------------------------------------------------

@st.composite
def valid_flat(draw, min_size=0):
    chosen = draw(st.lists(st.sampled_from(settings.SETTINGS), min_size=min_size, max_size=5,
                           unique_by=lambda s: s[0]))
    return {s[0]: draw(valid_value(s)) for s in chosen}


@st.composite
def desired_valid(draw):
    layer = draw(st.sampled_from(sorted(LAYER_TOPICS)))
    flat = draw(valid_flat())
    version = draw(st.one_of(st.integers(2, 2 ** 31), st.just(10 ** 30)))
    doc = {"version": version}
    doc.update(nest(flat))
    unknown = draw(st.lists(UNKNOWN_NAMES, max_size=3, unique=True))
    for k in unknown:
        doc.setdefault(k, draw(st.one_of(st.integers(), st.text(PRINTABLE, max_size=8))))
    keys = list(doc)
    order = draw(st.permutations(keys))
    doc = {k: doc[k] for k in order}
    if draw(st.integers(0, 9)) == 0:
        # Wide: one long unknown name with many children, each reported as prefix.child;
        # what the device reports about them must stay bounded (and fit a frame).
        wide = {"k%d" % i: i for i in range(draw(st.integers(1, 200)))}
        doc["u" * draw(st.integers(1, 600))] = wide
    text = dump(doc)
    if len(text) > 2048:
        text = dump({"version": version})
        flat = {}
    pad = draw(st.one_of(st.just(0), st.integers(0, 2048)))
    if pad and len(text) + pad <= 2048:
        text = text + b" " * pad  # within the limit, whitespace is no reason to refuse
    return Item("desired", LAYER_TOPICS[layer], text, "valid", (layer, flat),
                "valid %s" % ",".join(flat))


@st.composite
def desired_invalid(draw):
    layer = draw(st.sampled_from(sorted(LAYER_TOPICS)))
    flat = draw(valid_flat())
    doc = {"version": draw(st.integers(2, 1000))}
    how = draw(st.sampled_from(["value", "version", "top", "truncated", "token", "huge",
                                "deep", "unicode-key", "unicode-value", "key-type"]))
    if how == "value":
        s = draw(st.sampled_from(settings.SETTINGS))
        flat[s[0]] = draw(invalid_value(s))
    doc.update(nest(flat))
    if how == "version":
        v = draw(st.one_of(st.sampled_from(["2", 2.5, 2.0, -1, True, None, [2], {}]),
                           st.sampled_from([Raw(b"1e999"), Raw(b"-1e999"), -10 ** 30,
                                            -2 ** 63 - 1, Raw(b"1" + b"0" * 400 + b".0")]),
                           NAN_TOKENS, st.just("missing")))
        if v == "missing":
            del doc["version"]
        else:
            doc["version"] = v
    text = dump(doc)
    if how == "top":
        text = dump(draw(st.one_of(
            st.sampled_from([[], "text", 1, None, True, 2.5, [{"version": 2}], Raw(b'"{}"')]),
            st.lists(st.integers(), max_size=3))))
    elif how == "truncated":
        text = text[:draw(st.integers(1, len(text) - 1))]
    elif how == "token":
        text = text[:-1] + b', "telemetry_interval": ' + draw(NAN_TOKENS) + b"}"
    elif how == "huge":
        n = draw(st.integers(2049 - len(text), 70000))
        text = draw(st.sampled_from([
            text + b" " * n,
            text[:-1] + b', "pad": "' + b"x" * n + b'"}',
            text[:-1] + b', "pad": [' + b"1," * (n // 2) + b"1]}",
        ]))
    elif how == "deep":
        n = draw(st.one_of(st.integers(4, 12), st.integers(12, 5000)))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a": ', b"}")]))
        inner = opener * n + b"1" + closer * n
        if draw(st.booleans()):
            inner = opener * n  # never closed
        text = text[:-1] + b', "x": ' + inner + b"}"
    elif how == "unicode-key":
        text = text[:-1] + b', "k' + draw(BAD_UNICODE) + b'": 1}'
    elif how == "unicode-value":
        v = draw(st.sampled_from([b"info", b"", b"debug"]))
        text = text[:-1] + b', "log_level": "' + v + draw(BAD_UNICODE) + b'"}'
        if draw(st.booleans()):  # a BOM or junk in front of the document
            text = draw(st.sampled_from([b"\xef\xbb\xbf", b"\x00", b"\xff"])) + text
    elif how == "key-type":
        # MicroPython's json takes {1: 2} and {null: 2} (CPython refuses them).
        text = text[:-1] + draw(st.sampled_from([b", 1: 2}", b", null: 2}", b", true: {}}",
                                                 b", 2.5: 1}"]))
    if text == b"":
        text = b"{"
    return Item("desired", LAYER_TOPICS[layer], text, "invalid", None, "invalid:" + how)


@st.composite
def desired_any(draw):
    layer = draw(st.sampled_from(sorted(LAYER_TOPICS)))
    text = draw(st.one_of(
        st.binary(min_size=1, max_size=300),
        st.text(min_size=1, max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        # Valid JSON skeletons MicroPython reads leniently: missing commas or colons,
        # trailing commas, a key without a value.
        st.sampled_from([b'{"version": 3 "telemetry_interval": 9}', b'{"version": 3,}',
                         b'{"version": 3, "log_level"}', b'{,"version": 3}',
                         b'{"version": 3, "telemetry_interval": 9,,}', b'{"version":3:4}',
                         b'{"version": 3, "reconnect": {"cap" 300}}']),
    ))
    return Item("desired", LAYER_TOPICS[layer], text, "any", None, "any")


def desired_items():
    return st.one_of(desired_valid(), desired_invalid(), desired_invalid(), desired_any())


# ---- command bodies ------------------------------------------------------------------------

REQUEST_IDS = st.one_of(st.text(PRINTABLE, min_size=1, max_size=64),
                        st.integers(-2 ** 31, 2 ** 31))


@st.composite
def cmd_valid(draw):
    name = draw(st.sampled_from(COMMANDS + ("no-such-command", "x" * 32)))
    rid = draw(REQUEST_IDS)
    body = {"id": rid}
    if name == "logs" and draw(st.booleans()):
        body["n"] = draw(st.one_of(st.integers(-5, 100), st.just(10 ** 20), st.just("5")))
    if draw(st.booleans()):
        del body["id"]
        rid = None
    return Item("cmd", "devices/%s/cmd/%s" % (DEVICE, name), dump(body), "valid",
                (name, rid), "valid cmd")


@st.composite
def cmd_invalid(draw):
    name = draw(st.sampled_from(COMMANDS + ("no-such-command",)))
    how = draw(st.sampled_from(["top", "json", "token", "huge", "deep", "unicode", "id",
                                "long-name"]))
    body = {"id": draw(REQUEST_IDS)}
    text = dump(body)
    if how == "top":
        text = dump(draw(st.sampled_from([[], "ping", 1, None, True, [{"id": 1}]])))
    elif how == "json":
        text = draw(st.sampled_from([b"", b"{", b'{"id": ', b'{"id": "x"', b"\x00", b"}{",
                                     b'"unterminated']))
    elif how == "token":
        text = b'{"id": "t", "n": ' + draw(NAN_TOKENS) + b"}"
    elif how == "huge":
        text = b'{"id": "' + b"x" * draw(st.integers(2049, 8000)) + b'"}'
    elif how == "deep":
        n = draw(st.integers(4, 4000))
        text = b'{"id": "d", "x": ' + b"[" * n + b"]" * n + b"}"
    elif how == "unicode":
        text = b'{"id": "u' + draw(BAD_UNICODE) + b'"}'
    elif how == "id":
        text = dump({"id": draw(st.one_of(
            st.text(PRINTABLE, min_size=65, max_size=400), st.sampled_from(
                [[], {}, [1, 2], {"a": 1}, True, False, 1.5, Raw(b"1e999"), 10 ** 70])))})
    elif how == "long-name":
        name = "x" * draw(st.integers(33, 3000))
    return Item("cmd", "devices/%s/cmd/%s" % (DEVICE, name), text, "invalid", name,
                "invalid:" + how)


def cmd_items():
    return st.one_of(cmd_valid(), cmd_invalid(), cmd_invalid())


# ---- bootstrap configs ---------------------------------------------------------------------

IDS = st.text(ID_CHARS, min_size=1, max_size=64)
BAD_IDS = st.one_of(
    st.sampled_from(["", "a+b", "+", "#", "a/#", "a/b", "/", "a\x00b", "\x00", "x" * 65,
                     "dev\u202e", "d\u00e9v", "\U0001F600", "a b", "a\tb", "dev\n"]),
    st.text(min_size=65, max_size=200).filter(lambda s: s.strip() == s),
    st.sampled_from([5, None, True, [], {}, ["a"]]),
    st.text(ID_CHARS, min_size=0, max_size=10).flatmap(
        lambda s: st.sampled_from(["+", "#", "/", "\x00"]).map(lambda c: s + c)),
)
PREFIXES = st.text(PRINTABLE.replace("+", "").replace("#", ""), max_size=20)
BAD_PREFIXES = st.one_of(
    PREFIXES.flatmap(lambda p: st.sampled_from(["+", "#", "\x00", "\u00e9", "\u202e", "\n",
                                                "\U0001F600"]).map(lambda c: p + c)),
    st.sampled_from([5, True, [], {}, None]),
)
HOSTS = st.text(ID_CHARS, min_size=1, max_size=40)
ANY_TEXT = st.text(max_size=24)  # passwords and SSIDs may be any Unicode


@st.composite
def boot_valid_doc(draw):
    dev = draw(IDS)
    broker = {"host": draw(HOSTS)}
    for k, s in (("port", st.integers(1, 65535)), ("keepalive", st.integers(2, 65535)),
                 ("user", ANY_TEXT), ("password", ANY_TEXT), ("timeout", _round(1, 120)),
                 ("window", st.integers(1, 256)), ("max_frame", st.integers(256, 65536))):
        if draw(st.booleans()):
            broker[k] = draw(s)
    if draw(st.booleans()):
        base = draw(_round(0.05, 60))
        broker["reconnect"] = {"base": base, "cap": draw(_round(max(1, base), 3600)),
                               "first_window": draw(_round(0, 3600))}
    if draw(st.booleans()):
        broker["tls"] = {"ca": "/certs/ca.der", "server_hostname": draw(HOSTS)}
    doc = {"device_id": dev, "broker": broker}
    if draw(st.booleans()):
        doc["prefix"] = draw(PREFIXES)
    if draw(st.booleans()):
        doc["groups"] = draw(st.lists(IDS, max_size=4))
    if draw(st.booleans()):
        doc["wifi"] = draw(st.lists(st.fixed_dictionaries({"ssid": ANY_TEXT,
                                                           "password": ANY_TEXT}), max_size=3))
    if draw(st.booleans()):
        doc["telemetry_interval"] = draw(_round(0.05, 86400))
    if draw(st.booleans()):
        doc["outbox"] = {"policy": draw(st.sampled_from(["offline", "always"])),
                         "ram_bytes": draw(st.integers(1024, 262144))}
    return doc


def _boot_item(doc, label, note, ascii_=False):
    text = doc if isinstance(doc, bytes) else dump(doc, ascii_)
    return Item("boot", "", text, label, doc if label == "valid" else None, note)


@st.composite
def boot_valid(draw):
    doc = draw(boot_valid_doc())
    text = dump(doc, ascii_=False)
    if len(text) > 4096:
        doc = {"device_id": doc["device_id"], "broker": {"host": doc["broker"]["host"]}}
    return _boot_item(doc, "valid", "valid boot")


@st.composite
def boot_invalid(draw):
    doc = draw(boot_valid_doc())
    how = draw(st.sampled_from(["id", "group", "prefix", "number", "type", "top", "missing",
                                "huge", "deep", "json", "token"]))
    if how == "id":
        doc["device_id"] = draw(BAD_IDS)
    elif how == "group":
        doc["groups"] = draw(st.lists(IDS, max_size=2)) + [draw(BAD_IDS)]
    elif how == "prefix":
        doc["prefix"] = draw(BAD_PREFIXES)
    elif how == "number":
        k, lo, hi = draw(st.sampled_from([("telemetry_interval", 0.05, 86400),
                                          ("watchdog_ms", 1000, 60000),
                                          ("health_interval", 0.5, 86400)]))
        doc[k] = draw(st.one_of(st.floats(max_value=lo - 0.001, allow_nan=False,
                                          allow_infinity=False),
                                st.floats(min_value=hi + 0.001, allow_nan=False,
                                          allow_infinity=False),
                                HUGE_NUMBERS, WRONG_TYPES))
    elif how == "type":
        k = draw(st.sampled_from(["broker", "wifi", "groups", "outbox", "safe_mode", "ntp",
                                  "prefix", "profile"]))
        doc[k] = draw(st.sampled_from([5, "x", True, None, [], {}, [1]]).filter(
            lambda v: not (k in ("wifi", "groups") and v == [])
            and not (k in ("outbox", "safe_mode", "ntp") and v == {})
            and not (k == "prefix" and v == "x")))
    elif how == "top":
        return _boot_item(draw(st.sampled_from([[], "x", 1, None, [doc]])), "invalid", how)
    elif how == "missing":
        if draw(st.booleans()):
            del doc["device_id"]
        else:
            del doc["broker"]["host"]
    text = dump(doc, ascii_=False)
    if how == "huge":
        text = text + b" " * draw(st.integers(4097, 20000))  # over 4096 characters
    elif how == "deep":
        n = draw(st.integers(9, 2100))
        text = text[:-1] + b', "x": ' + b"[" * n + b"]" * n + b"}"
    elif how == "json":
        text = text[:draw(st.integers(0, len(text) - 1))]
    elif how == "token":
        text = text[:-1] + b', "telemetry_interval": ' + draw(NAN_TOKENS) + b"}"
    return _boot_item(text, "invalid", "invalid:" + how)


@st.composite
def boot_any(draw):
    return _boot_item(draw(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(
        lambda b: b'{"device_id": "a", "broker": {"host": "h"}, "x": "' + b + b'"}'))),
        "any", "any boot")


def boot_items():
    return st.one_of(boot_valid(), boot_invalid(), boot_invalid(), boot_any())


def all_items():
    return st.one_of(desired_items(), cmd_items(), boot_items())
