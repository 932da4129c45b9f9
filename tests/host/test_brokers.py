"""The firmware against a second broker: amqtt (PyPI, pure Python, in memory only), with the
real Unix-port firmware and paho observers, as the mosquitto tests do.

What amqtt does differently, and what these tests hold the firmware to (README "Other MQTT
brokers"): it keeps sessions only for clients that log in with a user name (so devices and
observers here have one), it forgets everything (sessions, queued and retained messages) when
it restarts, and on every CONNECT it pushes the connecting client each retained message that
matches anyone's subscription, its own topics or not.

The fixtures `broker` and `observer` of tests/conftest.py are replaced here by amqtt ones, so
conftest's `fleet` and `proxy` run against amqtt."""
import json
import os
import subprocess
import sys
import time

import pytest

from testbed.broker import Amqtt, amqtt_path
from testbed.observer import Observer
from testbed.proxy import DOWN, UP

try:
    amqtt_path()
    MISSING = None
except RuntimeError as e:
    MISSING = str(e)

pytestmark = pytest.mark.skipif(
    MISSING is not None, reason="amqtt broker not installed (%s)" % MISSING)

FLEETCTL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tools", "fleetctl.py")
# A user name gives a kept session on amqtt (its anonymous clients get none); amqtt as set up
# by testbed.broker.Amqtt checks no password.
OP = ("operator", "secret")


@pytest.fixture
def broker(tmp_path):
    b = Amqtt(tmp_path / "amqtt").start()
    yield b
    b.stop()


@pytest.fixture
def observer(broker):
    # Reconnects fast and subscribes again on every connect: it outlives a broker restart.
    o = Observer(broker.host, broker.port, auth=("observer", "x"), reconnect=(0.2, 1))
    yield o
    o.close()


def device(fleet, dev, **over):
    """A device logging in with its id as user name (amqtt keeps its session)."""
    # timeout 3: the first connect waits that long for amqtt's answer to the 5 CONNECT
    # (none: it waits for the rest of a 3.1.1 one) before the fallback to 3.1.1.
    b = {"user": dev, "password": "pw", "reconnect": {"first_window": 0.5}, "timeout": 3}
    b.update(over.pop("broker", {}))
    return fleet.device(dev, broker=b, **over)


def fleetctl(broker, *args, timeout=60):
    return subprocess.run(
        [sys.executable, FLEETCTL, "--broker", "%s:%d" % (broker.host, broker.port),
         "--user", OP[0]] + list(args),
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, FLEETCTL_PASSWORD=OP[1]))


def wait_for(cond, timeout, what):
    """Poll cond (the observer's SUBACK count is not an observed message)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def restart_broker(broker, observer):
    """Restart amqtt and wait until the observer has subscribed again on the new one."""
    subacks = observer.subacks
    broker.restart()  # SIGKILL: sessions, queues and retained messages gone
    wait_for(lambda: observer.subacks > subacks, 30, "observer subscribed again")


def telemetry(observer, dev):
    return observer.json("devices/%s/telemetry" % dev)


def seqs(observer, dev, boot=None):
    return sorted({t["seq"] for t in telemetry(observer, dev) if boot in (None, t["boot"])})


def assert_no_gap(observer, dev, boot=1):
    s = seqs(observer, dev, boot)
    assert s and s == list(range(1, s[-1] + 1)), "boot %d: seqs missing %r" % (
        boot, sorted(set(range(1, s[-1] + 1)) - set(s)) if s else "no telemetry")


def statuses(observer, dev, state="online"):
    return [s for s in observer.json("devices/%s/status" % dev) if s["state"] == state]


def reported(observer, dev):
    return observer.json("devices/%s/config/reported" % dev)


def wait_reported(observer, dev, pred, what, timeout=20):
    try:
        return observer.wait(lambda m: [r for r in reported(observer, dev) if pred(r)],
                             timeout, what)[-1]
    except AssertionError:
        raise AssertionError("timed out waiting for %s; reported: %r" % (
            what, reported(observer, dev)[-3:])) from None


def results(observer, dev, name):
    return observer.json("devices/%s/cmd/%s/result" % (dev, name))


def wait_result(observer, dev, name, rid, timeout=20):
    return observer.wait(lambda m: [r for r in results(observer, dev, name)
                                    if r["id"] == rid], timeout, "%s %s answered" % (name, rid))[0]


def test_connect_birth_and_qos1_telemetry_without_gaps(fleet, broker, observer):
    p = device(fleet, "am1", telemetry_interval=0.2)
    birth = observer.wait(lambda m: statuses(observer, "am1"), 30, "birth message")[0]
    assert birth["boot"] == 1 and birth["cause"] == "power-on" and birth["fw"]
    p.wait_line(r"am1 I connected \(session present: 0", 5)
    # amqtt speaks 3.1.1 only: "auto" asked in 5 first, then fell back within the attempt.
    p.wait_line(r"am1 W 127.0.0.1:\d+ does not speak MQTT 5: using 3.1.1 from now on", 1)
    observer.wait(lambda m: len(seqs(observer, "am1")) >= 20, 30, "20 telemetry messages")
    assert_no_gap(observer, "am1")
    assert all(t["v"] == 1 and t["boot"] == 1 for t in telemetry(observer, "am1"))
    # amqtt pushes, at each CONNECT, every retained message matching anyone's subscription:
    # a second device gets am1's status although it never subscribed to it. The firmware
    # ignores it (and says so), and runs on.
    q = device(fleet, "am2", telemetry_interval=0.5)
    q.wait_line(r"am2 W message on a foreign topic ignored: 'devices/am1/status'", 30)
    observer.wait(lambda m: len(seqs(observer, "am2")) >= 3, 30, "am2 telemetry")
    assert_no_gap(observer, "am2")
    assert "Traceback" not in p.output() + q.output()


def test_device_restart_resumes_its_kept_session_and_gets_what_was_queued(
        fleet, broker, observer):
    spec = fleet.spec("rs1", telemetry_interval=0.3,
                      broker={"user": "rs1", "password": "pw", "reconnect": {"first_window": 0.5},
                              "timeout": 3})
    p = fleet.start(spec)
    observer.wait(lambda m: len(seqs(observer, "rs1")) >= 5, 30, "telemetry of boot 1")
    wait_reported(observer, "rs1", lambda r: True, "first reported")
    p.stop()  # graceful: unacknowledged telemetry to flash, offline status, DISCONNECT
    observer.wait(lambda m: statuses(observer, "rs1", "offline"), 10, "offline")
    # Sent while the device is away: amqtt queues it for the device's kept session.
    observer.publish("devices/rs1/cmd/ping", json.dumps({"id": "away-1"}))
    n_reported = len(reported(observer, "rs1"))
    p2 = fleet.start(spec)
    p2.wait_line(r"rs1 I connected \(session present: 1", 30)
    # The fallback was remembered on flash: boot 2 asks in 3.1.1 at once.
    assert "does not speak MQTT 5" in p.output() and "does not speak" not in p2.output()
    assert wait_result(observer, "rs1", "ping", "away-1")["status"] == "ok"
    observer.wait(lambda m: len(seqs(observer, "rs1", 2)) >= 5, 30, "telemetry of boot 2")
    assert_no_gap(observer, "rs1", 1)
    assert_no_gap(observer, "rs1", 2)
    # Nothing resubscribed on a kept session, so a live command arrives too.
    observer.publish("devices/rs1/cmd/ping", json.dumps({"id": "live-1"}))
    assert wait_result(observer, "rs1", "ping", "live-1")["status"] == "ok"
    # The config did not change: at most one config/reported in boot 2 (amqtt sends the
    # device's retained layers again at CONNECT; the same versions change nothing).
    assert len(reported(observer, "rs1")) - n_reported <= 1, reported(observer, "rs1")[n_reported:]


def test_broker_restart_loses_everything_and_the_device_loses_no_accepted_telemetry(
        fleet, proxy, broker, observer):
    """amqtt keeps nothing across a restart: the device gets session-present = 0, subscribes
    again and sends again, as new messages, what was not acknowledged. What amqtt had
    acknowledged but not yet passed on when it died is amqtt's loss, not the device's; so the
    device is cut off first (through the fault proxy) and the broker killed once the observer
    has every message it acknowledged."""
    p = device(fleet, "br1", telemetry_interval=0.2)
    observer.publish("devices/br1/config/desired", json.dumps({"version": 3,
                                                               "health_interval": 120}),
                     retain=True)
    wait_reported(observer, "br1", lambda r: r["versions"].get("device") == 3, "layer applied")
    observer.wait(lambda m: len(seqs(observer, "br1")) >= 5, 30, "telemetry")
    proxy.refuse()
    proxy.cut()
    acked = {pk.pid for pk in proxy.packets if pk.type == "PUBACK" and pk.dir == DOWN}
    accepted = [pk for pk in proxy.packets if pk.type == "PUBLISH" and pk.dir == UP
                and pk.topic == "devices/br1/telemetry" and pk.pid in acked]
    observer.wait(lambda m: len(seqs(observer, "br1")) >= len(accepted), 15,
                  "every accepted message at the observer")
    restart_broker(broker, observer)
    before = max(seqs(observer, "br1"))
    proxy.refuse(False)
    p.wait_line(r"br1 I connected \(session present: 0", 60, count=2)
    observer.wait(lambda m: max(seqs(observer, "br1")) >= before + 10, 30, "telemetry resumes")
    assert_no_gap(observer, "br1")
    assert statuses(observer, "br1")[-1]["boot"] == 1  # a birth message on the new broker
    # It subscribed again to its commands on the new broker.
    observer.publish("devices/br1/cmd/ping", json.dumps({"id": "after-restart"}))
    assert wait_result(observer, "br1", "ping", "after-restart")["status"] == "ok"
    # Its retained layer is gone from the broker; the device keeps the config it applied.
    observer.publish("devices/br1/cmd/report", json.dumps({"id": "rep-1"}))
    wait_result(observer, "br1", "report", "rep-1")
    r = reported(observer, "br1")[-1]
    assert r["versions"].get("device") == 3 and r["effective"]["health_interval"] == 120, r


def test_broker_restart_then_fleetctl_set_still_moves_the_device_forward(
        fleet, broker, observer):
    """After amqtt lost the retained layer and the device's retained config/reported, an
    operator's change must still be taken (fleetctl: a layer version above the one the device
    applied), or fleetctl must say it was not. Needs the firmware/fleetctl fix "config
    versions surviving a broker losing retained messages"."""
    p = device(fleet, "fs1", telemetry_interval=1)
    r = fleetctl(broker, "set", "--device", "fs1", "telemetry_interval=2")
    assert r.returncode == 0, r.stderr
    wait_reported(observer, "fs1", lambda r: r["effective"]["telemetry_interval"] == 2,
                  "first change applied")
    # The first birth at the observer before the restart: amqtt may have acknowledged it
    # and died before passing it on.
    observer.wait(lambda m: statuses(observer, "fs1"), 30, "birth")
    restart_broker(broker, observer)
    p.wait_line(r"fs1 I connected \(session present: 0", 60, count=2)
    observer.wait(lambda m: statuses(observer, "fs1")[1:], 30, "birth on the new broker")
    r = fleetctl(broker, "set", "--device", "fs1", "telemetry_interval=3")
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_reported(observer, "fs1", lambda r: r["effective"]["telemetry_interval"] == 3,
                  "change after the broker restart applied")


def test_retained_config_layers_are_applied(fleet, broker, observer):
    # A group layer by fleetctl and a device layer by a plain retained publish, both before
    # the device exists: delivered as retained messages when it subscribes.
    r = fleetctl(broker, "set", "--group", "model-a", "telemetry_interval=0.5",
                 "reconnect.cap=300")
    assert r.returncode == 0, r.stderr
    observer.publish("fleet/all/config/desired", json.dumps({"version": 1, "log_level": "warn"}),
                     retain=True)
    observer.publish("devices/cf1/config/desired", json.dumps({"version": 2,
                                                               "health_interval": 120}),
                     retain=True)
    device(fleet, "cf1", groups=["model-a"])
    rep = wait_reported(observer, "cf1", lambda r: sorted(r["versions"]) == [
        "all", "device", "model-a"], "three layers applied")
    assert rep["versions"]["all"] == 1 and rep["versions"]["device"] == 2
    eff, src = rep["effective"], rep["source"]
    assert eff["telemetry_interval"] == 0.5 and src["telemetry_interval"] == "model-a"
    assert eff["reconnect.cap"] == 300 and eff["log_level"] == "warn"
    assert eff["health_interval"] == 120 and src["health_interval"] == "device"
    # A change while it runs arrives live; fleetctl reads the current layer back from amqtt
    # (retained) and moves its version forward.
    r = fleetctl(broker, "set", "--group", "model-a", "telemetry_interval=0.7")
    assert r.returncode == 0, r.stderr
    v = rep["versions"]["model-a"]
    rep = wait_reported(observer, "cf1", lambda r: r["versions"].get("model-a", 0) > v,
                        "group change applied")
    assert rep["effective"]["telemetry_interval"] == 0.7 and rep["effective"]["reconnect.cap"] == 300
    # amqtt delivers retained messages to a wildcard subscription (RabbitMQ does not).
    late = Observer(broker.host, broker.port, topics=("devices/+/config/reported",),
                    auth=("late", "x"))
    try:
        late.wait(lambda m: [x for x in m if x[1] == "devices/cf1/config/reported" and x[3]],
                  10, "retained reported through a wildcard")
    finally:
        late.close()


def test_commands_by_fleetctl_and_by_plain_publish_are_answered(fleet, broker, observer):
    p = device(fleet, "cm1", telemetry_interval=1)
    p.wait_line("cm1 I connected", 30)
    r = fleetctl(broker, "cmd", "cm1", "ping")
    assert r.returncode == 0, (r.stdout, r.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == "ok" and res["id"].startswith("fleetctl-") and "up" in res["data"]
    observer.publish("devices/cm1/cmd/ping", json.dumps({"id": 7}))
    assert wait_result(observer, "cm1", "ping", 7)["status"] == "ok"
    # A request id already executed (ping is not remembered; report is): answered as a
    # duplicate, not run again.
    observer.publish("devices/cm1/cmd/report", json.dumps({"id": "r-1"}))
    assert wait_result(observer, "cm1", "report", "r-1")["status"] == "ok"
    observer.publish("devices/cm1/cmd/report", json.dumps({"id": "r-1"}))
    observer.wait(lambda m: [x for x in results(observer, "cm1", "report")
                             if x["id"] == "r-1" and x["data"].get("duplicate")], 20,
                  "duplicate")
    r = fleetctl(broker, "cmd", "cm1", "self-destruct")
    assert r.returncode == 1 and "unknown command" in r.stdout, (r.stdout, r.stderr)
