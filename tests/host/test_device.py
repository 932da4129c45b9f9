"""The walking skeleton end to end: real Unix-port devices against a real mosquitto."""
import json
import os
import signal
import time

from testbed.devices import Spec
from testbed.observer import Observer


def telemetry(observer, dev):
    return observer.json("devices/%s/telemetry" % dev)


def statuses(observer, dev):
    return observer.matching("devices/%s/status" % dev)


def test_telemetry_arrives_with_increasing_seq(fleet, observer):
    fleet.device("t1", telemetry_interval=0.2)
    observer.wait(lambda m: len(telemetry(observer, "t1")) >= 5, 15, "5 telemetry messages")
    msgs = telemetry(observer, "t1")
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(1, len(seqs) + 1))
    for m in msgs:
        assert m["v"] == 1 and m["boot"] == 1
        assert isinstance(m["ts"], float) and abs(m["ts"] - time.time()) < 60
        assert isinstance(m["up"], int) and isinstance(m["temp_c"], float)


def test_boots_from_the_config_cached_on_flash(fleet, observer, tmp_path):
    p = fleet.device("c1", telemetry_interval=0.2)
    observer.wait(lambda m: telemetry(observer, "c1"), 15, "first boot telemetry")
    p.stop()
    # Second boot: nothing put on the flash, the config comes from the image alone.
    fleet.start(Spec(str(tmp_path / "c1.img")))
    observer.wait(lambda m: any(t["boot"] == 2 for t in telemetry(observer, "c1")), 15, "boot 2")
    second = [t["seq"] for t in telemetry(observer, "c1") if t["boot"] == 2]
    assert second[0] == 1, "seq restarts at 1 on a new boot"


def test_birth_message_is_retained_with_boot_and_version(fleet, broker, observer):
    fleet.device("b1")
    observer.wait(lambda m: statuses(observer, "b1"), 15, "birth message")
    late = Observer(broker.host, broker.port, topics=("devices/b1/status",))
    try:
        late.wait(lambda m: m, 5, "retained status")
        _, topic, payload, retain = late.messages[0]
        msg = json.loads(payload)
        assert retain and msg["state"] == "online" and msg["boot"] == 1 and msg["v"] == 1
        assert msg["fw"]
    finally:
        late.close()


def test_last_will_says_offline_after_kill_9(fleet, observer):
    # will_delay_s 1: MQTT 5's Will Delay Interval, 30 s by default (test_mqtt5 shows that a
    # return within it publishes no will).
    p = fleet.device("w1", broker={"will_delay_s": 1})
    observer.wait(lambda m: statuses(observer, "w1"), 15, "online")
    p.proc.send_signal(signal.SIGKILL)
    observer.wait(
        lambda m: any(json.loads(s[2])["state"] == "offline" for s in statuses(observer, "w1")),
        10, "last will",
    )
    will = json.loads(statuses(observer, "w1")[-1][2])
    assert will == {"v": 1, "state": "offline"}  # the will, not a graceful goodbye


def test_graceful_stop_publishes_offline_and_suppresses_the_will(fleet, observer):
    p = fleet.device("g1")
    observer.wait(lambda m: statuses(observer, "g1"), 15, "online")
    p.stop()
    assert p.proc.returncode == 0, p.output()
    observer.wait(lambda m: len(statuses(observer, "g1")) >= 2, 10, "offline")
    time.sleep(1.5)
    states = [json.loads(s[2]) for s in statuses(observer, "g1")]
    assert [s["state"] for s in states] == ["online", "offline"]
    assert states[1]["boot"] == 1  # ours, not the will (which has no boot)


def test_missing_config_is_one_error_line_and_the_device_waits(fleet, observer, tmp_path):
    p = fleet.start(Spec(str(tmp_path / "m1.img")))
    p.wait_line(r"E bootstrap config: /config.json missing", 10)
    time.sleep(1.0)
    assert p.alive(), p.output()
    assert len([l for l in p.output().splitlines() if " E " in l]) == 1
    assert not observer.matching("/telemetry")


def test_malformed_config_is_one_error_line_and_the_device_waits(fleet, tmp_path):
    p = fleet.start(Spec(str(tmp_path / "m2.img"), raw_config='{"device_id": "x", "broker": '))
    p.wait_line(r"E bootstrap config: /config.json is not valid JSON", 10)
    q = fleet.start(Spec(str(tmp_path / "m3.img"), config={"device_id": "a/+", "broker": {"host": "h"}}))
    q.wait_line(r"E bootstrap config: device_id 'a/\+' has a character outside", 10)
    time.sleep(1.0)
    assert p.alive() and q.alive()
    assert "Traceback" not in p.output() + q.output()


def test_two_devices_in_one_process(fleet, observer):
    p = fleet.start(fleet.spec("p1", telemetry_interval=0.2), fleet.spec("p2", telemetry_interval=0.2))
    observer.wait(
        lambda m: len(telemetry(observer, "p1")) >= 3 and len(telemetry(observer, "p2")) >= 3,
        15, "both devices",
    )
    assert len(fleet.procs) == 1 and p.alive()
    for dev in ("p1", "p2"):
        seqs = [t["seq"] for t in telemetry(observer, dev)]
        assert seqs == list(range(1, len(seqs) + 1)), (dev, seqs)
    assert os.path.exists(fleet.spec("p1").image) and os.path.exists(fleet.spec("p2").image)


def test_broker_restart_resumes_the_session_without_losing_telemetry(fleet, broker):
    topics = ("devices/r1/telemetry",)
    before = Observer(broker.host, broker.port, topics, client_id="obs-r1", clean=False)
    p = fleet.device("r1", telemetry_interval=0.3)
    before.wait(lambda m: len(before.json("r1/telemetry")) >= 3, 15, "telemetry before restart")
    broker.stop()  # persistence on: both sessions and the queued messages survive
    before.close()
    time.sleep(1.0)
    broker.start()
    after = Observer(broker.host, broker.port, topics, client_id="obs-r1", clean=False)
    try:
        p.wait_line(r"connected \(session present: 1", 30)
        after.wait(lambda m: len(after.json("r1/telemetry")) >= 3, 20, "telemetry after restart")
    finally:
        after.close()
    seqs = sorted({t["seq"] for t in before.json("r1/telemetry") + after.json("r1/telemetry")})
    assert seqs == list(range(1, seqs[-1] + 1)), "no seq lost across the restart: %r" % seqs
