"""Broker failover on the real firmware: two real mosquittos, a device that moves to the
secondary when the primary dies and back when it returns, losing nothing; a DNS name with
several addresses tried in turn before an attempt counts as failed."""
import json
import os
import subprocess
import sys

import pytest

from testbed.broker import Mosquitto
from testbed.devices import Spec
from testbed.observer import Observer

FLEETCTL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools", "fleetctl.py")
# Short everything: the defaults (12 attempts / 600 s, probe 300 s, window 600 s) are for
# fleets; a test must see both moves within seconds.
FAST = {"reconnect": {"base": 0.2, "cap": 1.0, "first_window": 0.5, "stable_s": 1.0}}
FAILOVER = {"after_attempts": 3, "after_s": 600, "probe_s": 1, "failback_window_s": 3}


@pytest.fixture
def second(tmp_path):
    m = Mosquitto(tmp_path / "broker2").start()
    yield m
    m.stop()


def births(obs, dev):
    return [d for d in obs.json("devices/%s/status" % dev) if d["state"] == "online"]


def seqs(*observers, dev):
    out = set()
    for o in observers:
        out.update(t["seq"] for t in o.json("devices/%s/telemetry" % dev) if t["boot"] == 1)
    return out


def test_fails_over_to_the_secondary_and_back_losing_nothing(fleet, broker, second):
    sec = Observer(second.host, second.port)
    # A kept session on the primary: a message it acknowledged just before it died and had
    # not yet passed on is delivered after its restart (a clean observer lost it once, and
    # the test blamed the device).
    back = observer = Observer(broker.host, broker.port, topics=("devices/fo1/#",),
                               client_id="fo1-watch", clean=False, reconnect=(0.2, 0.5))
    try:
        p = fleet.device("fo1", telemetry_interval=0.2, broker=FAST, failover=FAILOVER,
                         endpoints=[(second.host, second.port)])
        b = observer.wait(lambda m: births(observer, "fo1"), 20, "birth on the primary")[0]
        assert b["endpoint"] == 0 and b["broker"] == "%s:%d" % (broker.host, broker.port)
        observer.wait(lambda m: len(seqs(observer, dev="fo1")) >= 5, 20, "telemetry")

        broker.stop()  # the primary dies (its sessions stay on disk)
        b = sec.wait(lambda m: births(sec, "fo1"), 30, "birth on the secondary")[0]
        assert b["endpoint"] == 1 and b["broker"] == "%s:%d" % (second.host, second.port)
        out = b["outage"]
        assert out["from"] == "%s:%d" % (broker.host, broker.port)
        assert out["failed"] >= FAILOVER["after_attempts"]
        assert 0 < out["failover_s"] < 30
        # No session there: it subscribed, so commands and telemetry work on the secondary.
        sec.wait(lambda m: len(seqs(sec, dev="fo1")) >= 5, 20, "telemetry on the secondary")
        # fleetctl status, asked of the secondary, says where the device is.
        r = subprocess.run([sys.executable, FLEETCTL, "--broker", "%s:%d" % (
            second.host, second.port), "status", "fo1", "--json", "--wait", "2"],
            capture_output=True, text=True, timeout=60)
        row = json.loads(r.stdout.splitlines()[0])
        assert row["state"] == "online" and row["broker"] == b["broker"], r.stdout
        # A config layer retained on the secondary applies there like anywhere.
        sec.publish("devices/fo1/config/desired", json.dumps(
            {"version": 7, "health_interval": 600}), retain=True)
        sec.wait(lambda m: [d for d in sec.json("devices/fo1/config/reported")
                            if d["versions"].get("device") == 7], 20, "layer applied")
        sec.publish("devices/fo1/cmd/ping", json.dumps({"id": "on-b"}))
        sec.wait(lambda m: [r for r in sec.json("devices/fo1/cmd/ping/result")
                            if r["id"] == "on-b" and r["status"] == "ok"], 20, "ping answered")

        broker.start()  # back: a probe finds it, the device returns within the window
        # (The primary's retained status from before it died says online too: the birth
        # of the return is the one whose outage says it came back.)
        b = back.wait(lambda m: [d for d in births(back, "fo1")
                                 if d.get("outage", {}).get("failback")], 30,
                      "birth on the primary")[-1]
        assert b["endpoint"] == 0
        assert b["outage"]["from"] == "%s:%d" % (second.host, second.port)
        # It left the secondary gracefully: its status there says offline, no will.
        sec.wait(lambda m: [d for d in sec.json("devices/fo1/status")
                            if d["state"] == "offline"], 20, "offline on the secondary")
        top = max(seqs(sec, dev="fo1"))
        back.wait(lambda m: max(seqs(back, dev="fo1") or [0]) > top + 5, 20,
                  "telemetry on the primary again")
        # Loss 0: every seq up to the newest reached one of the brokers.
        got = seqs(back, sec, dev="fo1")
        assert set(range(1, max(got) + 1)) <= got
        health = fleet_health(back, p, "fo1")
        m = health["mqtt"]
        assert m["failovers"] == 1 and m["failbacks"] == 1 and m["endpoint"] == 0
        # Primary, secondary, primary again: the return held (it was once cut by the
        # move's own clean-up, a flap and a second connect).
        assert m["connects"] == 3, m
        # The secondary's offline status is older than the primary's online one.
        off = [d for d in sec.json("devices/fo1/status") if d["state"] == "offline"][-1]
        assert off["ts"] <= b["ts"]
    finally:
        back.close(forget=True)
        sec.close()


def fleet_health(obs, p, dev):
    obs.publish("devices/%s/cmd/report" % dev, json.dumps({"id": "rep"}))
    return obs.wait(lambda m: obs.json("devices/%s/health" % dev), 20, "health")[-1]


def test_tries_every_address_of_a_name_before_an_attempt_fails(fleet, broker, observer,
                                                               tmp_path):
    # broker.test has two addresses; mosquitto listens on 127.0.0.1 only, so 127.0.0.2 and
    # 127.0.0.3 refuse. The Unix board answers for the name from its control file.
    ctl = tmp_path / "ctl"
    ctl.write_text("dns:broker.test=127.0.0.2,127.0.0.3\n")
    cfg = fleet.config("dns1", telemetry_interval=0.5, broker=FAST)
    cfg["broker"]["host"] = "broker.test"
    p = fleet.start(Spec(str(tmp_path / "dns1.img"), config=cfg, control=str(ctl)))
    # Both dead: each round tries both addresses and counts as one failed attempt.
    p.wait_line(r"connect failed at tcp", 20, count=2)
    ctl.write_text("dns:broker.test=127.0.0.2,127.0.0.1\n")
    b = observer.wait(lambda m: births(observer, "dns1"), 20, "birth")[0]
    rounds = [ln for ln in p.lines if "connect failed at tcp" in ln]
    firsts = [ln for ln in p.lines if "broker.test address 1 of 2 failed at tcp" in ln]
    # The birth counts rounds, not addresses; the round that worked began with the dead
    # first address, and its second was tried before the attempt could count as failed.
    assert b["outage"]["failed"] == len(rounds) >= 2
    assert len(firsts) == len(rounds) + 1
