"""Hostile input, fuzzed with hypothesis (tests/host/hostile.py draws the documents).

Validator level: batches of bootstrap configs, desired config layers and command bodies go
through the firmware's own code inside the Unix port, one MicroPython process per batch
(tests/mpy/hostile_batch.py): every invalid input is refused with the firmware's own error
and counted, nothing raises anything else, valid inputs are accepted with their meaning, and
whatever the device publishes in answer (config/reported, command results) is strict UTF-8
JSON that fits a frame. `make test` runs 8 batches of 120; `make chaos` (marker `chaos`)
runs 40 of 150.

End to end: a running device against mosquitto gets a sample of hostile desired layers
(retained, on its group and device topics) and command bodies, counts and reports each
rejection, keeps its effective config and keeps publishing telemetry.
"""
import json
import math
import os
import subprocess
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st

import hostile
from firmware import settings
from testbed.devices import ROOT, micropython_path

BATCH = os.path.join(ROOT, "tests", "mpy", "hostile_batch.py")
FRAME = 4096  # the device's default max_frame


def run_batch(items, tmp):
    path = os.path.join(tmp, "batch.jsonl")
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps({"k": it.kind, "t": it.topic, "p": it.payload.hex()}) + "\n")
    image = os.path.join(tmp, "fz.img")
    if os.path.exists(image):
        os.remove(image)
    proc = subprocess.run([micropython_path(), BATCH, path, image], cwd=ROOT,
                          capture_output=True, timeout=300)
    out = proc.stdout.decode("utf-8", "replace")
    results = {}
    base = None
    for line in out.splitlines():
        if line.startswith("@@R "):
            r = json.loads(line[4:])
            results[r["i"]] = r
        elif line.startswith("@@BASE "):
            base = json.loads(line[7:])
    assert "@@END %d" % len(items) in out, "the batch did not finish (crash?):\n%s\n%s" % (
        out[-3000:], proc.stderr.decode("utf-8", "replace")[-3000:])
    return base, [results[i] for i in range(len(items))]


def strict_json(hexed):
    """What a consumer reads: strict UTF-8, strict JSON (no NaN, no lone surrogates)."""
    raw = bytes.fromhex(hexed)
    text = raw.decode("utf-8")  # raises on overlong forms, encoded surrogates, bad bytes

    def no_const(c):
        raise ValueError("non-JSON constant %s" % c)

    return json.loads(text, parse_constant=no_const)


def _close(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _topic_ok(b, what):
    s = bytes.fromhex(b).decode("utf-8")
    assert s and len(s) <= 64 and all(c in hostile.ID_CHARS for c in s), (what, s)


def check_boot(it, r):
    if r["r"] != "ok":
        assert r["r"] == "exc" and r["conf"] and r["e"] == "ConfigError", (
            "bootstrap config refused with %s, not ConfigError: %s"
            % (r["e"], bytes.fromhex(r["m"])))
        assert it.label != "valid", "a valid config refused: %s" % bytes.fromhex(r["m"])
        return
    assert it.label != "invalid", "an invalid bootstrap config was accepted"
    # Whatever is accepted builds topics without wildcards, NUL or non-UTF-8 bytes.
    _topic_ok(r["id"], "device_id")
    for g in r["groups"]:
        _topic_ok(g, "group")
    prefix = bytes.fromhex(r["prefix"]).decode("utf-8")
    assert all(" " <= c <= "~" and c not in "+#" for c in prefix), prefix
    if it.label == "valid":
        doc = it.expect
        assert bytes.fromhex(r["id"]).decode() == doc["device_id"]
        p = doc.get("prefix", "")
        assert prefix == (p + "/" if p and not p.endswith("/") else p)
        assert [bytes.fromhex(g).decode() for g in r["groups"]] == doc.get("groups", [])


def expected_effective(base, layer, flat):
    layers = {"device": dict(hostile.INITIAL)}
    layers[layer] = flat
    eff = dict(base)
    for name in ("all", hostile.GROUP, "device"):
        eff.update(layers.get(name, {}))
    return eff


def check_desired(it, r, base):
    assert r["r"] == "done", "%s escaped the config handler: %s" % (
        r.get("e"), bytes.fromhex(r.get("m", "")))
    rep = [p for t, p in r["sent"]
           if bytes.fromhex(t) == b"devices/%s/config/reported" % hostile.DEVICE.encode()]
    assert rep, "no config/reported published (too large for a frame?)"
    for t, p in r["sent"]:
        assert len(t) // 2 + len(p) // 2 + 8 <= FRAME
    doc = strict_json(rep[-1])
    assert doc["rejected"] == r["twin_rejected"] in (0, 1)
    if it.label == "invalid":
        assert r["twin_rejected"] == 1, "an invalid desired document was applied"
        assert r["unchanged"], "a rejected document changed the effective config"
        assert doc["rejections"][-1]["layer"] in ("all", hostile.GROUP, "device")
        assert r["eff"]["telemetry_interval"] == hostile.INITIAL["telemetry_interval"]
    elif it.label == "valid":
        assert r["twin_rejected"] == 0, "a valid document was rejected: %r" % doc.get(
            "rejections")
        want = expected_effective(base, *it.expect)
        bad = {k: (r["eff"].get(k), v) for k, v in want.items() if not _close(r["eff"].get(k), v)}
        assert not bad, "effective config differs (got, want): %r" % bad
    # Whatever was accepted is within the declared settings.
    for k, v in r["eff"].items():
        assert _close(settings.check(k, v, ()), v), (k, v)
    if doc.get("unknown"):
        names = [n for ns in doc["unknown"].values() for n in ns]
        assert len(names) <= 8 * 3 and all(len(n) <= 64 for n in names), names


def check_cmd(it, r):
    assert r["r"] == "done", "%s escaped the command handler: %s" % (
        r.get("e"), bytes.fromhex(r.get("m", "")))
    answers = [(bytes.fromhex(t).decode("utf-8"), strict_json(p)) for t, p in r["sent"]
               if bytes.fromhex(t).endswith(b"/result")]
    for t, p in r["sent"]:
        assert len(t) // 2 + len(p) // 2 + 8 <= FRAME
    name = it.topic.rsplit("/", 1)[-1]
    if it.label == "invalid" and len(name) > 32:
        assert answers == [] and r["cmd_rejected"] == 1, "a command name of %d characters" % (
            len(name))
        return
    assert len(answers) == 1, answers
    topic, ans = answers[0]
    assert topic == "devices/%s/cmd/%s/result" % (hostile.DEVICE, name)
    assert set(ans) == {"id", "status", "data"}
    if it.label == "invalid":
        assert ans["status"] == "error" and ans["id"] is None, ans
        assert "bad body" in ans["data"]["error"], ans
        assert r["cmd_rejected"] == 1 and r["cmd_handled"] == 0
    elif it.label == "valid":
        name, rid = it.expect
        assert ans["id"] == rid, ans
        if name in hostile.COMMANDS:
            assert ans["status"] == "ok" and r["cmd_handled"] == 1, ans
        else:
            assert ans == {"id": rid, "status": "error", "data": {"error": "unknown command"}}
            assert r["cmd_rejected"] == 1


def check_batch(items, tmp):
    base, results = run_batch(items, tmp)
    failed = []
    for it, r in zip(items, results):
        try:
            if it.kind == "boot":
                check_boot(it, r)
            elif it.kind == "desired":
                check_desired(it, r, base)
            else:
                check_cmd(it, r)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            failed.append("%r\n-> %s: %s" % (it, type(e).__name__, str(e).splitlines()[0]))
    assert not failed, "%d of %d inputs mishandled:\n%s" % (len(failed), len(items),
                                                           "\n".join(failed[:12]))


def _fuzz(n_batches, batch_size):
    # No shrinking: each step would be a MicroPython process, and the failure message
    # already names every input that was mishandled.
    @hsettings(max_examples=n_batches, deadline=None, phases=[Phase.explicit, Phase.generate],
               database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.large_base_example,
                                      HealthCheck.function_scoped_fixture])
    @given(items=st.lists(hostile.all_items(), min_size=batch_size, max_size=batch_size))
    def fuzz(tmp_path, items):
        check_batch(items, str(tmp_path))

    return fuzz


def test_hostile_documents_are_refused_by_the_firmwares_own_checks(tmp_path):
    _fuzz(8, 120)(tmp_path)


@pytest.mark.chaos
def test_hostile_documents_many_batches(tmp_path):
    _fuzz(40, 150)(tmp_path)


# Fixed examples, so each finding stays tested whatever hypothesis draws.
REGRESSIONS = [
    hostile.Item("boot", "", b'{"device_id": "a", "broker": {"host": "h"}, "prefix": null}',
                 "invalid"),
    hostile.Item("boot", "", b'{"device_id": "a", "broker": {"host": "h"}, "prefix": "\xc0\xab"}',
                 "invalid"),
    hostile.Item("boot", "", b'{"device_id": "a", "broker": {"host": "h"}, "x": '
                 + b"[" * 2000 + b"]" * 2000 + b"}", "invalid"),
    hostile.Item("boot", "", b'o\xf1\x0c', "invalid"),
    hostile.Item("desired", hostile.LAYER_TOPICS["device"], b'{"version": 2, 1: 2}', "invalid"),
    hostile.Item("desired", hostile.LAYER_TOPICS["all"], b'{"version": 2, "k\\ud800": 1}',
                 "invalid"),
    hostile.Item("desired", hostile.LAYER_TOPICS["all"], b'{"version": 2, "k\xc0\xaf": 1}',
                 "invalid"),
    hostile.Item("desired", hostile.LAYER_TOPICS["all"], b'{"version": 2, "'
                 + b"u" * 500 + b'": {' + b", ".join(b'"k%d": 1' % i for i in range(100))
                 + b"}}", "any"),
    hostile.Item("cmd", "devices/fz/cmd/ping", b'{"id": "\\ud800"}', "invalid"),
    hostile.Item("cmd", "devices/fz/cmd/ping", b'{"id": "' + b"x" * 2000 + b'"}', "invalid"),
    hostile.Item("cmd", "devices/fz/cmd/logs", b'{"id": 1, "x": ' + b"[" * 2000 + b"}",
                 "invalid"),
    hostile.Item("cmd", "devices/fz/cmd/" + "x" * 4000, b'{"id": 1}', "invalid"),
]


def test_known_hostile_documents(tmp_path):
    check_batch(REGRESSIONS, str(tmp_path))


# ---- end to end ----------------------------------------------------------------------------

E2E_DESIRED = [
    b"{not json",
    b'{"version": 5, "telemetry_interval": NaN}',
    b'{"version": 5, "telemetry_interval": 1e999}',
    b'{"version": 5, "telemetry_interval": "1"}',
    b'{"version": 5, 1: 2}',
    b'{"version": 5, "k\\ud800": 1}',
    b'{"version": 5, "log_level": "info\xc0\xaf"}',
    b'{"version": 5, "x": ' + b"[" * 900 + b"]" * 900 + b"}",
    b"[]",
    b'{"version": "6", "telemetry_interval": 0.2}',
]
E2E_COMMANDS = [
    b"", b"[]", b"{", b'{"id": "\\ud83d\\ude00"}', b'{"id": [1, 2]}',
    b'{"id": "' + b"x" * 3000 + b'"}', b'{"id": 1, "x": ' + b"[" * 3000 + b"}",
    b'{"id": "n", "n": NaN}', b"\xff\xfe",
]
# Over the device's max_frame (4 KiB): the MQTT client reads past them, acknowledges and
# drops them (before, it closed the connection, and the broker delivered them again on
# every reconnect: a retained one kept the device off the broker for good).
OVERSIZED = b'{"version": 7, "x": "' + b"y" * 6000 + b'"}'


def test_a_running_device_rejects_reports_and_keeps_going(fleet, observer):
    dev = "hz1"
    p = fleet.device(dev, groups=["model-x"], telemetry_interval=0.3, health_interval=60,
                     broker={"reconnect": {"first_window": 0.3}})
    observer.publish("devices/%s/config/desired" % dev, json.dumps(
        {"version": 1, "telemetry_interval": 0.5}), retain=True)

    def reported():
        return observer.json("devices/%s/config/reported" % dev)

    observer.wait(lambda m: any(r["versions"].get("device") == 1 for r in reported()), 15,
                  "good layer applied")
    topics = ["fleet/model-x/config/desired", "fleet/all/config/desired",
              "devices/%s/config/desired" % dev]
    for i, doc in enumerate(E2E_DESIRED):
        observer.publish(topics[i % 3], doc, retain=True)
    observer.publish(topics[0], OVERSIZED, retain=True)
    for body in E2E_COMMANDS + [OVERSIZED]:
        observer.publish("devices/%s/cmd/ping" % dev, body)
    try:
        r = observer.wait(lambda m: [r for r in reported() if r["rejected"] >= len(E2E_DESIRED)],
                          20, "every hostile layer rejected")[-1]
        results = observer.wait(
            lambda m: len(observer.matching("/cmd/ping/result")) >= len(E2E_COMMANDS) and
            observer.json("/cmd/ping/result"), 15, "an answer to every command")
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, p.output()[-3000:]))
    assert r["rejected"] == len(E2E_DESIRED), r
    assert r["effective"]["telemetry_interval"] == 0.5 and r["versions"] == {"device": 1}
    assert all(a["status"] == "error" and a["id"] is None for a in results), results
    assert len(results) == len(E2E_COMMANDS)
    # Counted in health too (asked for now), and telemetry keeps flowing at 0.5 s.
    observer.publish("devices/%s/cmd/report" % dev, json.dumps({"id": "r1"}))
    h = observer.wait(lambda m: [h for h in observer.json("devices/%s/health" % dev)
                                 if h["commands"]["rejected"] >= len(E2E_COMMANDS)], 10,
                      "health counting the rejected commands")[-1]
    assert h["config"]["rejected"] == len(E2E_DESIRED)
    assert h["commands"]["rejected"] == len(E2E_COMMANDS)
    # The two messages over max_frame never reach it: on MQTT 5 the device tells the broker
    # its Maximum Packet Size and mosquitto drops them (3.1.1: read past and counted, 2;
    # tests/host/test_rogue_broker.py).
    assert h["mqtt"]["protocol"] == "5" and h["mqtt"]["oversized"] == 0, h["mqtt"]
    assert h["mqtt"]["connects"] == 1, h["mqtt"]
    n = len(observer.json("devices/%s/telemetry" % dev))
    observer.wait(lambda m: len(observer.json("devices/%s/telemetry" % dev)) - n >= 3, 30,
                  "telemetry after the hostile input")
    tel = observer.json("devices/%s/telemetry" % dev)
    assert {t["boot"] for t in tel} == {1}, "rebooted"
    # Every message the device published is strict UTF-8 JSON.
    mine = [(t, pl) for _, t, pl, _ in observer.messages if t.startswith("devices/%s/" % dev)
            and not t.endswith("/config/desired") and ("/cmd/" not in t or t.endswith("/result"))]
    assert len(mine) > 20
    for t, pl in mine:
        strict_json(pl.hex())
    out = p.output()
    assert p.alive() and "Traceback" not in out and "MemoryError" not in out, out
    assert "handler failed" not in out and "protocol error" not in out, out
    assert out.count("E dropped a message of") == 0, out  # never sent to it (above)
