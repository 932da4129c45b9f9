"""tools/fleetctl.py end to end: the CLI run as a subprocess against a real mosquitto and
Unix-port devices; what the devices do (reported config, results, status) is checked with the
observer, not with the CLI's own word."""
import json
import os
import subprocess
import sys
import time

from testbed.broker import free_port
from tools.fleetctl import VERSION_EPOCH

FLEETCTL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tools", "fleetctl.py")
FAST = {"reconnect": {"first_window": 0.3}}


def fleetctl(broker, *args, timeout=30, env=None):
    """The CLI's run; `env`: variables added to this process's environment."""
    return subprocess.run(
        [sys.executable, FLEETCTL, "--broker", "%s:%d" % (broker.host, broker.port)] + list(args),
        capture_output=True, text=True, timeout=timeout,
        env=None if env is None else dict(os.environ, **env))


def reported(observer, dev):
    return observer.json("devices/%s/config/reported" % dev)


def wait_reported(observer, dev, pred, what, timeout=15):
    return observer.wait(lambda m: [r for r in reported(observer, dev) if pred(r)], timeout, what)


def wait_state(observer, dev, state, timeout=15):
    observer.wait(lambda m: [s for s in observer.json("devices/%s/status" % dev)
                             if s["state"] == state], timeout, "%s %s" % (dev, state))


def test_set_group_reaches_a_device_and_invalid_values_publish_nothing(fleet, broker, observer):
    fleet.device("s1", groups=["model-x"], broker=FAST)
    wait_reported(observer, "s1", lambda r: True, "first reported")
    topic = "fleet/model-x/config/desired"
    before = int(time.time()) - VERSION_EPOCH
    r = fleetctl(broker, "set", "--group", "model-x", "telemetry_interval=7", "reconnect.cap=300")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(topic)
    # A new layer's first version: seconds since 2025-01-01, above any it could have had.
    v1 = json.loads(r.stdout.splitlines()[0][len(topic) + 1:])["version"]
    assert before <= v1 <= int(time.time()) - VERSION_EPOCH and v1 < 2 ** 30
    # fleetctl waited for the device: it took the layer before fleetctl returned.
    assert "applied by 1 of 1 device (version %d)" % v1 in r.stdout, r.stdout
    rep = wait_reported(observer, "s1", lambda r: r["versions"].get("model-x") == v1,
                        "group layer v1 applied", timeout=1)[-1]
    assert rep["effective"]["telemetry_interval"] == 7
    assert rep["source"]["telemetry_interval"] == "model-x"
    assert rep["effective"]["reconnect.cap"] == 300
    sent = observer.matching(topic)
    assert len(sent) == 1 and json.loads(sent[0][2]) == {
        "version": v1, "reconnect": {"cap": 300}, "telemetry_interval": 7}
    # The next change takes the next version and keeps the layer's other keys.
    r = fleetctl(broker, "set", "--group", "model-x", "log_level=warn")
    assert r.returncode == 0, r.stderr
    rep = wait_reported(observer, "s1", lambda r: r["versions"].get("model-x") == v1 + 1,
                        "group layer v2 applied")[-1]
    assert rep["effective"]["log_level"] == "warn"
    assert rep["effective"]["telemetry_interval"] == 7 and rep["effective"]["reconnect.cap"] == 300
    n = len(observer.matching(topic))
    # Refused with exit 2 and a reason naming the setting; nothing reaches the broker.
    for bad, why in [("telemetry_interval=-1", "telemetry_interval must be in 0.05..86400"),
                     ("telemetry_interval=fast", "telemetry_interval must be a number"),
                     ("colour=red", "colour: not a setting"),
                     ("outbox.ram_bytes=2048.5", "outbox.ram_bytes must be an integer")]:
        r = fleetctl(broker, "set", "--group", "model-x", "log_level=debug", bad)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert why in r.stderr and "nothing published" in r.stderr, r.stderr
        assert r.stdout == ""
    time.sleep(0.5)
    assert len(observer.matching(topic)) == n
    rep = reported(observer, "s1")[-1]
    assert rep["versions"]["model-x"] == v1 + 1 and rep["effective"]["log_level"] == "warn"
    assert rep["rejected"] == 0


def test_cmd_prints_the_result_with_exit_codes_for_ok_error_timeout_and_no_broker(
        fleet, broker, observer):
    fleet.device("c1", broker=FAST)
    wait_state(observer, "c1", "online")
    r = fleetctl(broker, "cmd", "c1", "logs", "--body", '{"n": 3}')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "ok" and res["id"].startswith("fleetctl-")
    lines = res["data"]["lines"]
    assert 1 <= len(lines) <= 3 and all(l.startswith("c1 ") for l in lines)
    # What was printed is what the device answered.
    assert [json.loads(p) for _, t, p, _ in observer.messages
            if t == "devices/c1/cmd/logs/result"] == [res]
    r = fleetctl(broker, "cmd", "c1", "report", "--body", '{"id": "op-1"}')
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "id": "op-1", "status": "ok", "data": {"health": True}}
    observer.wait(lambda m: observer.matching("devices/c1/health"), 5, "health from report")
    # The firmware answers an unknown command with an error result: exit 1.
    r = fleetctl(broker, "cmd", "c1", "self-destruct")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    res = json.loads(r.stdout)
    assert res["status"] == "error" and res["data"] == {"error": "unknown command"}
    # Nobody answers: 3, with the request id to retry with.
    r = fleetctl(broker, "cmd", "ghost", "ping", "--timeout", "1")
    assert r.returncode == 3 and "no result" in r.stderr and r.stdout == ""
    # No broker: 4, one line.
    r = subprocess.run([sys.executable, FLEETCTL, "--broker", "127.0.0.1:%d" % free_port(),
                        "cmd", "c1", "ping"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "cannot reach broker" in r.stderr


def _row(out, dev):
    rows = [l.split() for l in out.splitlines() if l.split()[:1] == [dev]]
    assert len(rows) == 1, out
    return rows[0]


def test_status_shows_a_device_online_then_offline_after_a_graceful_stop(fleet, broker, observer):
    p = fleet.device("st1", broker=FAST)
    fleet.device("st2", broker=FAST)
    wait_state(observer, "st1", "online")
    wait_state(observer, "st2", "online")
    r = fleetctl(broker, "status", "--wait", "1.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["DEVICE", "STATE", "BOOT"]
    row = _row(r.stdout, "st1")
    assert row[1:4] == ["online", "1", "power-on"], r.stdout
    _row(r.stdout, "st2")
    # A pattern; --report gets a health document now, so the queue depth is known.
    r = fleetctl(broker, "status", "st1", "--wait", "2", "--report", "--json")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [d["device"] for d in docs] == ["st1"]
    assert docs[0]["state"] == "online" and isinstance(docs[0]["queued"], int)
    assert docs[0]["last_seen_s"] is not None and docs[0]["last_seen_s"] < 3
    p.stop()
    wait_state(observer, "st1", "offline")
    r = fleetctl(broker, "status", "st*", "--wait", "1")
    assert r.returncode == 0, r.stderr
    assert _row(r.stdout, "st1")[1] == "offline", r.stdout
    assert _row(r.stdout, "st2")[1] == "online", r.stdout


def test_tail_of_a_pattern_prints_telemetry_of_the_matching_devices_only(fleet, broker, observer):
    fleet.start(*[fleet.spec(d, telemetry_interval=0.2, broker=FAST)
                  for d in ("pump-1", "pump-2", "fan-1")])
    for d in ("pump-1", "pump-2", "fan-1"):
        observer.wait(lambda m: observer.matching("devices/%s/telemetry" % d), 15, d)
    start = time.monotonic()
    r = fleetctl(broker, "tail", "pump-*", "--kind", "telemetry", "--count", "20", "--json",
                 "--duration", "20")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(lines) == 20
    assert {l["device"] for l in lines} == {"pump-1", "pump-2"}, lines
    assert all(l["kind"] == "telemetry" and l["data"]["v"] == 1 for l in lines)
    # fan-1 was publishing meanwhile: left out by the pattern, not for want of messages.
    assert [m for m in observer.matching("devices/fan-1/telemetry") if m[0] > start]
    # One device by id, human lines; --duration ends a tail that got fewer than --count.
    # Every kind by default: which two come first depends on when the device's first health
    # falls (a random moment after its boot), so the kind is one of them, not telemetry.
    r = fleetctl(broker, "tail", "fan-1", "--count", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    assert all(l.split()[1] == "fan-1" and l.split()[2] in ("telemetry", "status", "health")
               for l in r.stdout.splitlines()), r.stdout
    r = fleetctl(broker, "tail", "valve-*", "--count", "1", "--duration", "1")
    assert r.returncode == 3 and r.stdout == ""


def test_a_dot_in_a_device_id_or_group_is_refused_saying_why(broker, observer):
    # RabbitMQ delivers "." as "/": such a device or group would not work on every broker.
    for args in (["set", "--group", "model-x.v3.1", "log_level=warn"],
                 ["set", "--device", "pump.7", "log_level=warn"],
                 ["cmd", "pump.7", "ping"], ["tail", "pump.7", "--count", "1"],
                 ["status", "pump.7"], ["ota", "status", "--group", "model-x.v3"]):
        r = fleetctl(broker, *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert "RabbitMQ" in r.stderr and "not portable across brokers" in r.stderr, r.stderr
    assert not observer.matching("config/desired") and not observer.matching("cmd/ping")


def test_cmd_carries_an_expiry_and_an_expired_command_is_refused_not_run(
        fleet, broker, observer):
    p = fleet.device("x1", broker=FAST)
    wait_state(observer, "x1", "online")
    t0 = time.time()
    r = fleetctl(broker, "cmd", "x1", "ping")
    assert r.returncode == 0, r.stderr
    sent = json.loads(observer.matching("devices/x1/cmd/ping")[-1][2])
    assert t0 + 299 <= sent["exp"] <= time.time() + 301, sent
    r = fleetctl(broker, "cmd", "x1", "ping", "--expires", "0")
    assert r.returncode == 0 and "exp" not in json.loads(
        observer.matching("devices/x1/cmd/ping")[-1][2])
    # Yesterday's reboot, handed over late by a broker: refused, answered, not run.
    exp = int(time.time()) - 86400
    r = fleetctl(broker, "cmd", "x1", "reboot", "--body", json.dumps({"id": "old-1", "exp": exp}))
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    res = json.loads(r.stdout)
    assert res["id"] == "old-1" and res["status"] == "error"
    assert res["data"]["error"] == "expired" and res["data"]["exp"] == exp
    assert abs(res["data"]["now"] - time.time()) < 60
    r = fleetctl(broker, "cmd", "x1", "report")  # health now: the refusal is counted
    assert r.returncode == 0, r.stderr
    h = observer.wait(lambda m: observer.json("devices/x1/health"), 10, "health")[-1]
    assert h["commands"]["rejected"] == 1, h["commands"]
    assert "rebooting" not in p.output()
    assert [s["boot"] for s in observer.json("devices/x1/status")] == [1]


def test_set_reports_devices_that_ignore_a_stale_version_and_offline_ones_as_pending(
        fleet, broker, observer):
    # Two devices run version 100 of their group layer (from their flash cache); then the
    # broker loses its retained messages (here: the layer is cleared while they are away).
    topic = "fleet/pumps/config/desired"
    a = fleet.device("v1", groups=["pumps"], broker=FAST)
    b = fleet.device("v2", groups=["pumps"], broker=FAST)
    observer.publish(topic, json.dumps({"version": 100, "telemetry_interval": 5}), retain=True)
    for d in ("v1", "v2"):
        wait_reported(observer, d, lambda r: r["versions"].get("pumps") == 100, d)
    b.stop()
    wait_state(observer, "v2", "offline")
    # What an older fleetctl did when the broker had lost the layer: version 1. The device
    # ignores it, says so in its reported document and its log.
    observer.publish(topic, json.dumps({"version": 1, "telemetry_interval": 9}), retain=True)
    rep = wait_reported(observer, "v1", lambda r: "stale" in r, "stale reported")[-1]
    assert rep["stale"] == {"pumps": {"got": 1, "have": 100}}
    assert rep["effective"]["telemetry_interval"] == 5 and rep["groups"] == ["pumps"]
    a.wait_line(r"v1 W config from pumps ignored: version 1 is not newer than the applied 100")
    # fleetctl goes past every version the devices report: v1 applies it; the offline v2
    # is pending, not a failure.
    r = fleetctl(broker, "set", "--group", "pumps", "telemetry_interval=3", "--wait", "15")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout.splitlines()[0][len(topic) + 1:])["version"] == 101
    assert "applied by 1 of 2 devices (version 101)" in r.stdout, r.stdout
    assert "pending (offline; they get it when they connect): v2" in r.stdout, r.stdout
    rep = wait_reported(observer, "v1", lambda r: r["versions"].get("pumps") == 101, "101",
                        timeout=1)[-1]
    assert "stale" not in rep and rep["effective"]["telemetry_interval"] == 3
    # A device runs a version far above any fleetctl picks (2^29, from an operator's own
    # file); then the broker loses every retained message and session (a restart without
    # its database). fleetctl finds no version and takes the time-based one, below 2^29:
    # the device refuses it as stale and says which version it runs, so fleetctl publishes
    # once more past it, and the change is taken.
    observer.publish("devices/v1/config/desired", json.dumps({"version": 2 ** 29}),
                     retain=True)
    wait_reported(observer, "v1", lambda r: r["versions"].get("device") == 2 ** 29, "2^29")
    online = len([s for s in observer.json("devices/v1/status") if s["state"] == "online"])
    broker.stop()
    os.remove(os.path.join(broker.workdir, "mosquitto.db"))
    broker.start()
    observer.wait(lambda m: len([s for s in observer.json("devices/v1/status")
                                 if s["state"] == "online"]) > online, 20, "v1 back online")
    r = fleetctl(broker, "set", "--device", "v1", "log_level=debug", "--wait", "15")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "stale: ignored as not newer than the version they run: v1 (runs %d)" % 2 ** 29 \
        in r.stdout, r.stdout
    assert "(again: past the version they run)" in r.stdout, r.stdout
    assert "applied by 1 of 1 device (version %d)" % (2 ** 29 + 1) in r.stdout, r.stdout
    rep = wait_reported(observer, "v1", lambda r: r["versions"].get("device") == 2 ** 29 + 1,
                        "2^29 + 1", timeout=1)[-1]
    assert "stale" not in rep and rep["effective"]["log_level"] == "debug"
