"""tools/fleetctl.py end to end: the CLI run as a subprocess against a real mosquitto and
Unix-port devices; what the devices do (reported config, results, status) is checked with the
observer, not with the CLI's own word."""
import json
import os
import queue
import subprocess
import sys
import threading
import time

from testbed.broker import free_port
from testbed.observer import Observer
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


# ---- an application's events, state, health and settings -----------------------------------
# Devices with an app are not ready yet: these tests publish the device-side documents
# themselves, retained where a device retains them (README "Topic contract").


class Tail:
    """fleetctl tail running as a subprocess; its output lines as they come."""

    def __init__(self, broker, *args):
        self.p = subprocess.Popen(
            [sys.executable, FLEETCTL, "--broker", "%s:%d" % (broker.host, broker.port), "tail"]
            + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout=15):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no line from fleetctl tail within %g s" % timeout)
        assert line is not None, "fleetctl tail ended: %s" % self.p.stderr.read()
        return line

    def end(self, timeout=15):
        rc = self.p.wait(timeout)
        return rc, self.p.stderr.read()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def event(seq, data, boot=3):
    return json.dumps({"v": 1, "seq": seq, "boot": boot, "up": 1000 * seq, "ts": 1767225600.5,
                       "data": data})


STATE = {"v": 1, "boot": 3, "ts": 1767225600.1,
         "state": {"relay": {"on": True, "since": 123}, "env_alarm": False}}


def test_tail_prints_app_events_and_state_of_the_matching_devices(broker, observer):
    observer.publish("devices/pump-1/state", json.dumps(STATE), retain=True)
    tail = Tail(broker, "pump-*", "--kind", "event,state", "--retained", "--count", "4")
    try:
        # The retained state comes first, once the subscription is made: then live messages.
        first = tail.line()
        assert first.split(" ", 1)[1] == "pump-1 state (retained) %s" % json.dumps(STATE), first
        observer.publish("devices/fan-1/event/alarm", event(1, {"level": 9}))  # not matched
        observer.publish("devices/pump-1/telemetry", json.dumps({"v": 1, "seq": 1}))  # kind
        observer.publish("devices/pump-1/event/alarm", event(1, {"level": 7}))
        observer.publish("devices/pump-2/event/door", event(2, "open", boot=5))
        off = dict(STATE, state={"relay": {"on": False, "since": 456}, "env_alarm": False})
        observer.publish("devices/pump-1/state", json.dumps(off), retain=True)
        lines = [tail.line() for _ in range(3)]
        assert tail.end() == (0, "")
    finally:
        tail.kill()
    rest = [l.split(" ", 1)[1] for l in lines]
    assert rest == ['pump-1 event alarm boot=3 seq=1 {"level": 7}',
                    'pump-2 event door boot=5 seq=2 "open"',
                    "pump-1 state %s" % json.dumps(off)], lines


def test_tail_shows_events_by_default_and_as_json(broker, observer):
    observer.publish("devices/v-1/status", json.dumps({"v": 1, "state": "online", "boot": 3}),
                     retain=True)
    tail = Tail(broker, "v-1", "--retained", "--json", "--count", "3")
    try:
        first = json.loads(tail.line())
        assert first["kind"] == "status" and first["retained"] is True, first
        observer.publish("devices/v-1/event/flow", event(4, [1.5, 2]))
        observer.publish("devices/v-1/event/bad", b"not json")
        lines = [json.loads(tail.line()) for _ in range(2)]
        assert tail.end() == (0, "")
    finally:
        tail.kill()
    for l in lines:
        assert isinstance(l.pop("t"), float)
    assert lines == [
        {"device": "v-1", "kind": "event", "event": "flow", "retained": False,
         "data": json.loads(event(4, [1.5, 2]))},
        {"device": "v-1", "kind": "event", "event": "bad", "retained": False,
         "data": "not json"}]
    # A kind that is not one: refused, saying which there are.
    r = fleetctl(broker, "tail", "v-1", "--kind", "events")
    assert r.returncode == 2 and "telemetry,status,health,event,state" in r.stderr, r.stderr


def _health(dev, app=None):
    doc = {"v": 1, "boot": 4, "up": 60, "reset_cause": "power-on", "outbox": {"queued": 0}}
    if app is not None:
        doc["app"] = app
    return json.dumps(doc)


APP_HEALTH = {"loaded": True, "error": None,
              "sensors": {"temp": {"reads": 120, "errors": 3, "timeouts": 1,
                                   "last_error": "OSError: 19"},
                          "hum": {"reads": 120, "errors": 0, "timeouts": 0}},
              "commands": {"handled": 10, "errors": 2},
              "events": {"queued": 0, "dropped_q0": 4}, "tasks": {}}


def test_status_shows_the_app_its_problems_and_its_state(broker, observer):
    def status(state, boot, **extra):
        return json.dumps(dict({"v": 1, "state": state, "boot": boot, "fw": "1.2.0",
                                "cause": "power-on", "prev_up_s": None}, **extra))

    # a1: an app with trouble and a state; a2: an app that failed to set up (its status says
    # so, and it sends no health); a3: no app; a4: offline, its state from an earlier boot.
    observer.publish("devices/a1/status", status("online", 4), retain=True)
    observer.publish("devices/a1/state", json.dumps(dict(STATE, boot=4)), retain=True)
    observer.publish("devices/a2/status", status("online", 2, app={
        "loaded": False, "error": "ImportError: no module named 'sensors'"}), retain=True)
    observer.publish("devices/a3/status", status("online", 1), retain=True)
    observer.publish("devices/a4/status", status("offline", 5), retain=True)
    observer.publish("devices/a4/state", json.dumps(dict(STATE, boot=4, state={"n": 1})),
                     retain=True)
    observer.publish("devices/b1/status", status("online", 1), retain=True)
    # The devices answer the report command (status --report) with health.
    answers = {"a1": _health("a1", APP_HEALTH),
               "a3": _health("a3", {"loaded": False, "error": None})}

    def device(t, topic, payload, retain):
        dev = topic.split("/")[1]
        if topic.endswith("/cmd/report") and dev in answers:
            fake.c.publish("devices/%s/health" % dev, answers[dev], 1)

    fake = Observer(broker.host, broker.port, topics=("devices/+/cmd/report",),
                    on_message=device)
    try:
        r = fleetctl(broker, "status", "a*", "--report", "--wait", "3")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["DEVICE", "STATE", "BOOT", "CAUSE", "FW", "LAST", "SEEN",
                                    "QUEUE", "APP"], r.stdout
        assert _row(r.stdout, "a1")[-1] == "ok" and _row(r.stdout, "a2")[-1] == "failed"
        assert _row(r.stdout, "a3")[-1] == "none" and _row(r.stdout, "a4")[-1] == "-"
        i = {l.split()[0]: n for n, l in enumerate(lines) if not l.startswith(" ")}
        assert lines[i["a1"] + 1:i["a2"]] == [
            "  app: sensor temp 3 errors, 1 timeouts of 120 reads (last: OSError: 19); "
            "commands 2 errors of 10 handled; events 4 QoS 0 dropped",
            '  state: relay={"on":true,"since":123} env_alarm=false'], r.stdout
        assert lines[i["a2"] + 1:i["a3"]] == [
            "  app error: ImportError: no module named 'sensors'"], r.stdout
        assert lines[i["a3"] + 1:i["a4"]] == [], r.stdout
        assert lines[i["a4"] + 1:] == ["  state: n=1 (boot 4)"], r.stdout
        # --json: the app section (health's, else the status's) and the state document.
        r = fleetctl(broker, "status", "a*", "--report", "--wait", "3", "--json")
        assert r.returncode == 0, r.stderr
        rows = {d["device"]: d for d in map(json.loads, r.stdout.splitlines())}
        assert rows["a1"]["app"] == APP_HEALTH and rows["a1"]["app_state"] == dict(STATE, boot=4)
        assert rows["a2"]["app"]["error"].startswith("ImportError") \
            and rows["a2"]["app_state"] is None
        assert rows["a3"]["app"] == {"loaded": False, "error": None}
        assert rows["a4"]["app"] is None and rows["a4"]["app_state"]["state"] == {"n": 1}
        # No device with an app: the table as before, no APP column.
        r = fleetctl(broker, "status", "b1", "--wait", "0.5")
        assert r.returncode == 0 and "APP" not in r.stdout and "state:" not in r.stdout
    finally:
        fake.close()


class AppDevice:
    """Plays device d1 with an app declaring one setting, threshold (a number): it takes
    its desired layer as the firmware would and reports it on config/reported."""

    def __init__(self, broker, observer):
        self.observer = observer
        self.version = None
        self.effective = {"telemetry_interval": 60, "app.threshold": 50}
        self.source = {"telemetry_interval": "default", "app.threshold": "default"}
        self.rejections = []
        self.unknown = []
        observer.publish("devices/d1/status", json.dumps({"v": 1, "state": "online",
                                                          "boot": 1}), retain=True)
        self.report()
        self.c = Observer(broker.host, broker.port, topics=("devices/d1/config/desired",),
                          on_message=self.on_layer)

    def report(self, publish=None):
        doc = {"effective": self.effective, "source": self.source,
               "versions": {} if self.version is None else {"device": self.version},
               "rejected": len(self.rejections), "rejections": self.rejections[-4:],
               "groups": [], "cache": "ok", "pending_reboot": []}
        if self.unknown:
            doc["unknown"] = {"device": self.unknown}
        (publish or self.observer.publish)("devices/d1/config/reported", json.dumps(doc),
                                           retain=True)

    def on_layer(self, t, topic, payload, retain):
        if not payload:
            return
        layer = json.loads(payload)
        app = layer.get("app", {})
        if not isinstance(app.get("threshold", 0), (int, float)):
            self.rejections.append({"layer": "device", "version": layer["version"],
                                    "reason": "app.threshold must be a number"})
        else:
            self.version = layer["version"]
            self.unknown = ["app." + k for k in app if k != "threshold"]
            if "threshold" in app:
                self.effective["app.threshold"] = app["threshold"]
                self.source["app.threshold"] = "device"
        # From paho's thread: published without waiting for the PUBACK.
        self.report(lambda topic, text, retain: self.c.c.publish(topic, text, 1, retain))

    def close(self):
        self.c.close()


def test_set_app_settings_nests_them_and_the_device_checks_them(broker, observer):
    dev = AppDevice(broker, observer)
    topic = "devices/d1/config/desired"
    try:
        r = fleetctl(broker, "set", "--device", "d1", "app.threshold=60", "app.mode=eco",
                     "telemetry_interval=30")
        assert r.returncode == 0, (r.stdout, r.stderr)
        sent = observer.json(topic)
        v = sent[-1]["version"]
        # Dotted names nest: app.NAME goes into the layer's "app" object.
        assert sent == [{"version": v, "app": {"mode": "eco", "threshold": 60},
                         "telemetry_interval": 30}]
        assert r.stdout.splitlines()[0] == "%s %s" % (topic, json.dumps(sent[-1]))
        assert "applied by 1 of 1 device (version %d)" % v in r.stdout, r.stdout
        # The device's app has no setting "mode": fleetctl could not know, the device says.
        assert "applied without the keys it does not know: d1 (app.mode)" in r.stdout, r.stdout
        # The next change keeps the layer's other keys (read back from the retained layer),
        # KEY= removes one; a bool and a string are values too.
        r = fleetctl(broker, "set", "--device", "d1", "app.mode=", "app.armed=true",
                     "app.label=\"42\"")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert observer.json(topic)[-1] == {
            "version": v + 1, "app": {"armed": True, "label": "42", "threshold": 60},
            "telemetry_interval": 30}
        # A value of the right shape that the app refuses: the device rejects the layer.
        r = fleetctl(broker, "set", "--device", "d1", "app.threshold=high")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert observer.json(topic)[-1]["app"]["threshold"] == "high"
        assert "rejected: d1 (app.threshold must be a number)" in r.stdout, r.stdout
        n = len(observer.matching(topic))
        # What fleetctl can tell by itself: refused, exit 2, nothing published.
        for bad, why in [("app.Threshold=1", "app.Threshold: an app setting is app.NAME"),
                         ("app.1x=1", "app.1x: an app setting is app.NAME"),
                         ("app.a.b=1", "app.a.b: an app setting is app.NAME"),
                         ("app.x=[1, 2]", "app.x must be a number, true, false or a string"),
                         ("app.x={\"y\": 1}", "app.x must be a number, true, false or a string"),
                         ("app.x=NaN", "app.x must be a finite number")]:
            r = fleetctl(broker, "set", "--device", "d1", bad)
            assert r.returncode == 2, (bad, r.returncode, r.stderr)
            assert why in r.stderr and "nothing published" in r.stderr, r.stderr
        # fleetctl config shows the app's settings with where they come from.
        r = fleetctl(broker, "config", "d1", "app.*")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert [l.split() for l in lines[:2]] == [["SETTING", "VALUE", "SOURCE"],
                                                  ["app.threshold", "60", "device"]], r.stdout
        assert "versions: device %d" % (v + 1) in lines
        assert "  rejection: device version %d: app.threshold must be a number" % (v + 2) \
            in lines, r.stdout
        assert "unknown (not applied): device: app.armed, app.label" in lines, r.stdout
    finally:
        dev.close()
    assert len(observer.matching(topic)) == n


def test_config_prints_the_effective_settings_and_what_the_layers_did(broker, observer):
    rep = {"effective": {"telemetry_interval": 30, "log_level": "info", "app.threshold": 60,
                         "app.mode": "eco"},
           "source": {"telemetry_interval": "model-x", "log_level": "default",
                      "app.threshold": "device", "app.mode": "all"},
           "versions": {"all": 3, "model-x": 7, "device": 12}, "rejected": 1,
           "rejections": [{"layer": "device", "version": 11, "reason": "app.threshold must "
                                                                        "be in 0..100"}],
           "unknown": {"model-x": ["colour"]}, "stale": {"all": {"got": 2, "have": 3}},
           "groups": ["model-x"], "cache": "ok", "pending_reboot": ["outbox.policy"]}
    observer.publish("devices/c9/config/reported", json.dumps(rep), retain=True)
    r = fleetctl(broker, "config", "c9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "SETTING             VALUE   SOURCE",
        'app.mode            "eco"   all',
        "app.threshold       60      device",
        'log_level           "info"  default',
        "telemetry_interval  30      model-x",
        "versions: all 3, model-x 7, device 12",
        "rejected: 1",
        "  rejection: device version 11: app.threshold must be in 0..100",
        "unknown (not applied): model-x: colour",
        "stale: all version 2 ignored, runs 3",
        "pending reboot: outbox.policy",
        "cache: ok"], r.stdout
    r = fleetctl(broker, "config", "c9", "app.*", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == dict(
        rep, effective={"app.mode": "eco", "app.threshold": 60},
        source={"app.mode": "all", "app.threshold": "device"})
    r = fleetctl(broker, "config", "ghost", "--read-wait", "1")
    assert r.returncode == 3 and "no config/reported retained for ghost" in r.stderr
    assert r.stdout == ""
