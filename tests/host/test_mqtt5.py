"""MQTT 5 against mosquitto (which speaks it) and against scripted brokers for the reason
codes mosquitto never sends: the session kept and expired, Receive Maximum, Maximum Packet
Size, Server Keep Alive, PUBACK error codes, topic aliases, will delay, overload and
credential refusals, and redirects that are followed only to a broker the device knows."""
import json
import re
import time

import pytest

from testbed.broker import Mosquitto
from testbed.observer import Observer
from testbed.proxy import DOWN, UP, FaultProxy
from test_rogue_broker import RogueBroker


def seqs(observer, dev, boot=1):
    return sorted({t["seq"] for t in observer.json("devices/%s/telemetry" % dev)
                   if t["boot"] == boot})


def assert_no_gap(observer, dev, boot=1):
    s = seqs(observer, dev, boot)
    assert s and s == list(range(1, s[-1] + 1)), sorted(set(range(1, s[-1] + 1)) - set(s))


def statuses(observer, dev, state=None):
    return [s for s in observer.json("devices/%s/status" % dev) if state in (None, s["state"])]


@pytest.fixture
def mosq5(tmp_path):
    """mosquitto with limits a 5 client hears in its CONNACK: Receive Maximum 2 (its
    max_inflight_messages), Server Keep Alive 20 (max_keepalive), Topic Alias Maximum 10
    (its default), and an ACL that refuses one device's telemetry at first."""
    m = Mosquitto(tmp_path / "mosq5", extra_conf="max_inflight_messages 2\nmax_keepalive 20\n",
                  acl="topic deny devices/deny1/telemetry\ntopic readwrite #\n").start()
    yield m
    m.stop()


def test_session_kept_in_5_then_expired_resubscribes_and_says_so(fleet, broker, tmp_path):
    px = FaultProxy(broker.host, broker.port).start()
    try:
        fleet.endpoint = (px.host, px.port)
        spec = fleet.spec("s5", broker={"session_expiry_s": 4, "will_delay_s": 7})
        p = fleet.start(spec)
        p.wait_line(r"s5 I connected \(session present: 0", 20)
        c = [pk for pk in px.packets if pk.type == "CONNECT"][0]
        assert c.version == 5 and c.clean is False and c.props == {0x11: 4, 0x27: 4099}, (
            c.version, c.props)
        p.stop()
        # Back within the expiry: the session is there, nothing is subscribed again.
        mark = px.mark()
        p = fleet.start(spec)
        p.wait_line(r"s5 I connected \(session present: 1", 20)
        assert not px.packets_since(mark, "SUBSCRIBE", UP)
        assert "kept no session" not in p.output()
        p.stop()
        gone = time.monotonic()
        # Gone longer than session_expiry_s: the broker has forgotten it. (A protocol timer:
        # nothing to observe but the clock.)
        time.sleep(max(0.0, gone + 5.5 - time.monotonic()))
        mark = px.mark()
        p = fleet.start(spec)
        p.wait_line(r"s5 I broker kept no session for us: subscribing", 20)
        p.wait_line(r"s5 I connected \(session present: 0", 5)
        assert px.packets_since(mark, "SUBSCRIBE", UP)
    finally:
        px.stop()


def test_receive_maximum_2_holds_the_window_and_nothing_is_lost(fleet, mosq5):
    fleet.endpoint = (mosq5.host, mosq5.port)
    px = FaultProxy(mosq5.host, mosq5.port).start()
    obs = Observer(mosq5.host, mosq5.port)
    try:
        fleet.endpoint = (px.host, px.port)
        # A backlog first (refused for a while), then a fast stream: the window is what
        # limits it, not the producer.
        px.refuse()
        p = fleet.device("rm1", telemetry_interval=0.05, broker={"keepalive": 60})
        p.wait_line(r"rm1 W connect failed", 20, count=3)
        px.latency(0.05)  # so that acknowledgements do not come back before the next write
        px.refuse(False)
        line = p.wait_line(r"rm1 I connected \(session present: 0, resent: 0, sent: \d+", 30)
        assert int(re.search(r", sent: (\d+)", line[0]).group(1)) > 2, line
        p.wait_line(r"rm1 I broker sets keepalive 20 s \(ours 60\)", 30)
        obs.wait(lambda m: len(seqs(obs, "rm1")) >= 60, 30, "60 telemetry messages")
        # Outstanding QoS 1 messages the device had at any moment on the wire.
        worst = 0
        open_ = set()
        for pk in px.packets:
            if pk.type == "PUBLISH" and pk.dir == UP and pk.qos == 1:
                open_.add((pk.conn, pk.pid))
                worst = max(worst, len(open_))
            elif pk.type == "PUBACK" and pk.dir == DOWN:
                open_.discard((pk.conn, pk.pid))
        assert worst == 2, worst
        assert_no_gap(obs, "rm1")
        # Telemetry went with a topic alias after its first message on the connection.
        tel = [pk for pk in px.packets if pk.type == "PUBLISH" and pk.dir == UP
               and pk.topic == "devices/rm1/telemetry"]
        assert tel[0].alias == 1 and tel[0].size > tel[-1].size
        assert all(pk.alias == 1 for pk in tel)
    finally:
        obs.close()
        px.stop()


def test_a_puback_error_keeps_the_message_until_the_broker_takes_it(fleet, mosq5, tmp_path):
    fleet.endpoint = (mosq5.host, mosq5.port)
    obs = Observer(mosq5.host, mosq5.port)
    try:
        p = fleet.device("deny1", telemetry_interval=0.2, broker={"keepalive": 4},
                         health_interval=1)
        p.wait_line(r"deny1 W broker refused a message on b'devices/deny1/telemetry': "
                    r"not authorized; kept to send again", 20)
        h = obs.wait(lambda m: [x for x in obs.json("devices/deny1/health")
                                if x["mqtt"]["puback_errors"] >= 3], 20, "errors in health")
        assert h[-1]["mqtt"]["last_reason"] == "not authorized"
        assert h[-1]["mqtt"]["protocol"] == "5"
        assert not seqs(obs, "deny1")
        # The operator fixes the ACL: what was refused arrives, from seq 1, without a gap.
        with open(tmp_path / "mosq5" / "acl", "w") as f:
            f.write("topic readwrite #\n")
        mosq5.reload()
        obs.wait(lambda m: len(seqs(obs, "deny1")) >= 40, 40, "telemetry after the fix")
        assert_no_gap(obs, "deny1")
        assert "Traceback" not in p.output()
    finally:
        obs.close()


def test_a_message_over_the_brokers_maximum_packet_size_is_refused_and_counted(
        fleet, tmp_path):
    m = Mosquitto(tmp_path / "small", extra_conf="max_packet_size 400\n").start()
    obs = Observer(m.host, m.port)
    try:
        fleet.endpoint = (m.host, m.port)
        # config/reported (about 700 bytes) is larger than the broker takes.
        p = fleet.device("mp1", telemetry_interval=0.5)
        p.wait_line(r"mp1 E message of \d+ bytes on b'devices/mp1/config/reported' over the "
                    r"broker's maximum packet size 400: not sent", 20)
        obs.wait(lambda m: len(seqs(obs, "mp1")) >= 5, 20, "telemetry goes on")
        assert_no_gap(obs, "mp1")
        assert p.alive() and "Traceback" not in p.output()
        assert "link lost" not in p.output()  # never sent to be cut by the broker
    finally:
        obs.close()
        m.stop()


def test_will_delay_hides_a_quick_return_and_reports_a_real_loss(fleet, broker, observer):
    spec = fleet.spec("wd1", broker={"will_delay_s": 4, "reconnect": {"first_window": 0.3}})
    p = fleet.start(spec, restart=True)
    observer.wait(lambda m: statuses(observer, "wd1", "online"), 20, "birth")
    # Power cut, back within the delay (the runner powers it up after 0.5-2 s): the broker
    # publishes no last will, the next birth is all consumers see.
    assert p.power_cut()
    observer.wait(lambda m: [s for s in statuses(observer, "wd1", "online") if s["boot"] == 2],
                  30, "boot 2 online")
    assert not statuses(observer, "wd1", "offline")
    # Gone for good: the will arrives, after the delay.
    p.kill()
    cut = time.monotonic()
    observer.wait(lambda m: statuses(observer, "wd1", "offline"), 20, "last will")
    will = [m for m in observer.matching("devices/wd1/status") if b"offline" in m[2]][0]
    assert will[0] - cut >= 3.5, will[0] - cut


CONNACK5 = "\x20\x03\x00%s\x00"


@pytest.mark.parametrize("rc,name,floor", [
    (0x89, "server busy", 2.0), (0x97, "quota exceeded", 2.0),
    (0x9F, "connection rate exceeded", 2.0), (0x88, "server unavailable", 2.0),
    (0x87, "not authorized", 5.0), (0x86, "bad user name or password", 5.0)])
def test_reason_coded_refusals_back_off_by_kind_and_are_named(fleet, tmp_path, rc, name, floor):
    rogue = RogueBroker(None, connack=bytes([0x20, 3, 0, rc, 0]))
    try:
        cfg = fleet.config("rc1", broker={
            "protocol": "5", "timeout": 2, "reconnect": {
                "first_window": 0.2, "base": 0.2, "busy_floor": 2.0, "hard_floor": 5.0,
                "hard_cap": 6.0}})
        cfg["broker"]["host"], cfg["broker"]["port"] = "127.0.0.1", rogue.port
        from testbed.devices import Spec
        p = fleet.start(Spec(str(tmp_path / "rc1.img"), config=cfg))
        lines = p.wait_line(r"rc1 \S connect failed at connack: Refused\('CONNACK refused: %s'"
                            r".*retry in ([0-9.]+) s" % name, 15)
        delay = float(re.search(r"retry in ([0-9.]+) s", lines[0]).group(1))
        assert delay >= floor, (name, delay)
    finally:
        rogue.close()


def test_redirect_followed_only_to_a_listed_broker(fleet, broker, observer, tmp_path):
    from testbed.devices import Spec, device_config
    listed = "127.0.0.1:%d" % broker.port
    ref = listed.encode()
    props = b"\x1c" + len(ref).to_bytes(2, "big") + ref
    rogue = RogueBroker(None, connack=b"\x20" + bytes([3 + len(props), 0, 0x9C, len(props)])
                        + props)
    evil = b"evil.example:1883"
    eprops = b"\x1c" + len(evil).to_bytes(2, "big") + evil
    rogue2 = RogueBroker(None, connack=b"\x20" + bytes([3 + len(eprops), 0, 0x9D, len(eprops)])
                         + eprops)
    try:
        rec = {"first_window": 0.3, "base": 0.3}
        cfg = device_config("rd1", "127.0.0.1", rogue.port, endpoints=[
            ("127.0.0.1", broker.port)], broker={"reconnect": rec, "timeout": 2})
        p = fleet.start(Spec(str(tmp_path / "rd1.img"), config=cfg))
        p.wait_line(r"rd1 W use another server: 127.0.0.1:%d sends us to %s" % (
            rogue.port, listed), 15)
        birth = observer.wait(lambda m: statuses(observer, "rd1", "online"), 20, "birth")[0]
        assert birth["outage"]["from"] == "127.0.0.1:%d" % rogue.port, birth
        assert birth["outage"]["redirected"] and birth["outage"]["reason"] == "use another server"
        # An unlisted host is never followed: a refusal, and the device stays with its own.
        cfg = device_config("rd2", "127.0.0.1", rogue2.port, broker={"reconnect": rec,
                                                                     "timeout": 2})
        q = fleet.start(Spec(str(tmp_path / "rd2.img"), config=cfg))
        q.wait_line(r"rd2 E server moved names b'evil.example:1883', not one of our brokers: "
                    r"not followed", 15)
        q.wait_line(r"rd2 \S connect failed at connack: Refused\('CONNACK refused: server "
                    r"moved'", 5)
        assert rogue2.connections >= 1 and "evil" not in q.output().split("not followed")[-1]
    finally:
        rogue.close()
        rogue2.close()


def _fleetctl(broker, *args):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, os.path.join(root, "tools", "fleetctl.py"),
                           "--broker", "%s:%d" % (broker.host, broker.port)] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_an_expired_command_is_dropped_by_a_5_broker_and_refused_by_the_device_on_311(
        fleet, broker, observer):
    spec = fleet.spec("ex1")
    p = fleet.start(spec)
    p.wait_line(r"ex1 I connected", 20)
    p.stop()
    observer.wait(lambda m: statuses(observer, "ex1", "offline"), 10, "offline")
    # Both wait in the device's kept session: one with a Message Expiry Interval (5), one
    # with only the body's "exp" (a 3.1.1 sender).
    r5 = _fleetctl(broker, "--timeout", "1", "cmd", "ex1", "ping", "--expires", "2",
                   "--body", '{"id": "by-5"}')
    r3 = _fleetctl(broker, "--protocol", "3.1.1", "--timeout", "1", "cmd", "ex1", "ping",
                   "--expires", "2", "--body", '{"id": "by-311"}')
    assert r5.returncode == 3 and r3.returncode == 3, (r5.stderr, r3.stderr)
    sent = time.monotonic()
    time.sleep(max(0.0, sent + 3 - time.monotonic()))  # both expire (a protocol timer)
    p = fleet.start(spec)
    p.wait_line(r"ex1 I connected \(session present: 1", 20)
    # A live command after them: once it is answered, anything queued before has arrived.
    observer.publish("devices/ex1/cmd/ping", json.dumps({"id": "live"}))
    observer.wait(lambda m: [r for r in observer.json("devices/ex1/cmd/ping/result")
                             if r["id"] == "live"], 20, "live answered")
    results = {r["id"]: r for r in observer.json("devices/ex1/cmd/ping/result")}
    assert results["by-311"]["status"] == "error" and "expired" in json.dumps(
        results["by-311"]), results  # the device's own check
    assert "by-5" not in results  # the broker dropped it: never delivered
