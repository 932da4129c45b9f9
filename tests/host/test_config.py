"""Config twin end to end: retained desired layers on a real mosquitto, Unix-port devices,
the reported document they publish, the cache on their flash."""
import json
import re
import threading
import time

from testbed.devices import Spec
from testbed.observer import Observer
from testbed.proxy import DOWN, UP

FAST = {"reconnect": {"first_window": 0.3}}


def reported(observer, dev):
    return [json.loads(p) for _, t, p, _ in observer.messages
            if t == "devices/%s/config/reported" % dev]


def wait_reported(observer, dev, pred, what, timeout=15):
    return observer.wait(lambda m: [r for r in reported(observer, dev) if pred(r)], timeout, what)


def desired(observer, topic, version, **settings):
    doc = {"version": version}
    doc.update(settings)
    observer.publish(topic, json.dumps(doc), retain=True)


def test_group_layer_reaches_running_and_future_devices_and_the_device_layer_wins(
        fleet, broker, observer):
    fleet.device("g1", groups=["model-x"], broker=FAST)
    wait_reported(observer, "g1", lambda r: True, "first reported")
    desired(observer, "fleet/model-x/config/desired", 3, telemetry_interval=7,
            reconnect={"cap": 300})
    desired(observer, "fleet/all/config/desired", 1, log_level="warn", telemetry_interval=9)
    r = wait_reported(observer, "g1", lambda r: r["versions"].get("model-x") == 3
                      and r["versions"].get("all") == 1, "group layers applied")[-1]
    assert r["effective"]["telemetry_interval"] == 7  # the group beats `all`
    assert r["source"]["telemetry_interval"] == "model-x"
    assert r["effective"]["log_level"] == "warn" and r["source"]["log_level"] == "all"
    assert r["effective"]["reconnect.cap"] == 300
    # A device that boots for the first time later gets the retained layers at once.
    fleet.device("g2", groups=["model-x"], broker=FAST)
    r2 = wait_reported(observer, "g2", lambda r: r["versions"].get("model-x") == 3,
                       "layers for the new device")[-1]
    assert r2["effective"]["telemetry_interval"] == 7
    # The device layer wins over every group.
    desired(observer, "devices/g2/config/desired", 1, telemetry_interval=2.5)
    r2 = wait_reported(observer, "g2", lambda r: r["versions"].get("device") == 1,
                       "device layer")[-1]
    assert r2["effective"]["telemetry_interval"] == 2.5 and r2["source"]["telemetry_interval"] == "device"
    # An older version of a layer is ignored.
    desired(observer, "fleet/model-x/config/desired", 2, telemetry_interval=99)
    time.sleep(1)
    assert reported(observer, "g1")[-1]["effective"]["telemetry_interval"] == 7


def test_bad_documents_are_rejected_reported_and_the_device_keeps_its_config(fleet, observer):
    p = fleet.device("b1", broker=FAST)
    desired(observer, "devices/b1/config/desired", 1, telemetry_interval=3)
    wait_reported(observer, "b1", lambda r: r["versions"].get("device") == 1, "good layer")
    bad = [
        "{not json",
        json.dumps({"version": "2", "telemetry_interval": 4}),
        json.dumps({"version": 2, "telemetry_interval": -4}),
        json.dumps({"version": 2, "log_level": 5}),
        json.dumps({"version": 2, "a": {"b": {"c": {"d": {"e": 1}}}}}),
        json.dumps({"version": 2, "pad": "x" * 3000}),
        "[]",
    ]
    for text in bad:
        observer.publish("devices/b1/config/desired", text, retain=True)
    r = wait_reported(observer, "b1", lambda r: r["rejected"] >= len(bad), "rejections")[-1]
    assert r["effective"]["telemetry_interval"] == 3 and r["versions"]["device"] == 1
    assert r["rejections"][-1]["layer"] == "device"
    # Unknown keys are reported, not applied; the known ones in the same layer apply.
    desired(observer, "devices/b1/config/desired", 5, telemetry_interval=4, colour="red")
    r = wait_reported(observer, "b1", lambda r: r["versions"].get("device") == 5, "v5")[-1]
    assert r["unknown"] == {"device": ["colour"]} and r["effective"]["telemetry_interval"] == 4
    assert p.alive() and "Traceback" not in p.output()


def _wait_acked(proxy, topic, timeout=10):
    """Until the device's last PUBLISH on `topic` has its PUBACK back through the proxy."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pubs = [p for p in proxy.packets_since((0, 0, 0), "PUBLISH", UP) if p.topic == topic]
        if pubs and any(a.pid == pubs[-1].pid and a.t >= pubs[-1].t
                        for a in proxy.packets_since((0, 0, 0), "PUBACK", DOWN)):
            return
        time.sleep(0.05)
    raise AssertionError("no PUBACK for the last PUBLISH on %s" % topic)


def test_reported_only_on_change_and_nothing_asked_on_reconnect(fleet, proxy, observer):
    p = fleet.device("q1", broker=FAST)
    wait_reported(observer, "q1", lambda r: True, "first reported")
    desired(observer, "devices/q1/config/desired", 1, log_level="debug")
    wait_reported(observer, "q1", lambda r: r["versions"].get("device") == 1, "applied")
    # Cut only once that report's PUBACK has reached the device: one still in flight would
    # be resent after the reconnect (at least once), which is not a new report.
    _wait_acked(proxy, "devices/q1/config/reported")
    n = len(reported(observer, "q1"))
    m = proxy.mark()
    proxy.cut()
    p.wait_line(r"q1 I connected \(session present: 1", 15)
    time.sleep(1)
    assert len(reported(observer, "q1")) == n, "a reconnect publishes no reported"
    assert not proxy.packets_since(m, "SUBSCRIBE"), "a reconnect with a session asks nothing"
    # The same document again (a refresh re-delivers it): not newer, nothing published.
    desired(observer, "devices/q1/config/desired", 1, log_level="debug")
    time.sleep(1)
    assert len(reported(observer, "q1")) == n


def test_the_cache_is_used_at_boot_without_a_broker_and_a_corrupt_one_means_defaults(
        fleet, proxy, observer, tmp_path):
    image = str(tmp_path / "c1.img")
    cfg = fleet.config("c1", telemetry_interval=1, broker=FAST)
    p = fleet.start(Spec(image, config=cfg))
    desired(observer, "devices/c1/config/desired", 1, telemetry_interval=0.2)
    wait_reported(observer, "c1", lambda r: r["versions"].get("device") == 1, "applied")
    p.stop()
    proxy.refuse()  # the broker is out of reach for the next boot
    p = fleet.start(Spec(image))
    p.wait_line("c1 W connect failed", 10)
    time.sleep(2)
    proxy.refuse(False)
    observer.wait(lambda m: len([t for t in observer.json("devices/c1/telemetry")
                                 if t["boot"] == 2]) >= 8, 15, "boot 2 telemetry")
    ups = [t["up"] for t in observer.json("devices/c1/telemetry") if t["boot"] == 2][:8]
    gaps = [b - a for a, b in zip(ups, ups[1:])]
    assert max(gaps) < 600, gaps  # 0.2 s from the cache, not the bootstrap's 1 s
    p.stop()
    # A corrupt cache: defaults (the bootstrap's), and the report says why.
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"crc": 1, "body": "{}"}')
    p = fleet.start(Spec(image, files={"/config-cache.json": str(corrupt)}))
    r = wait_reported(observer, "c1", lambda r: r["cache"].startswith("corrupt"),
                      "corrupt cache reported")[-1]
    assert r["effective"]["telemetry_interval"] == 1 and r["source"]["telemetry_interval"] == "bootstrap"


def test_refreshes_of_twenty_devices_are_spread_over_the_interval(fleet, proxy, observer):
    t_refresh = 4.0
    n = 20
    fleet.start(*[fleet.spec("r%02d" % i, refresh_interval=t_refresh, telemetry_interval=30,
                             broker=FAST) for i in range(n)])

    def refreshes():
        """Each connection's first refresh, in s after its connect's SUBSCRIBE: the schedule
        is each device's own, so a busy host that boots them late does not shift it."""
        subs = {}
        for pk in list(proxy.packets):
            if pk.type == "SUBSCRIBE" and pk.dir == "up":
                subs.setdefault(pk.conn, []).append(pk.t)
        return sorted(ts[1] - ts[0] for ts in subs.values() if len(ts) > 1)

    end = time.monotonic() + 60
    while len(refreshes()) < n - 1 and time.monotonic() < end:
        time.sleep(0.2)
    firsts = refreshes()
    assert len(firsts) >= n - 1, firsts
    assert firsts[-1] - firsts[0] >= t_refresh / 2, firsts  # spread, not in step
    per_second = [0] * 7
    for t in firsts:
        per_second[min(6, int(t))] += 1
    assert max(per_second) <= 10, per_second


def _results(observer, dev, name):
    return observer.json("devices/%s/cmd/%s/result" % (dev, name))


def _online_boots(observer, dev):
    return [s["boot"] for s in observer.json("devices/%s/status" % dev) if s["state"] == "online"]


def test_reboot_delivered_twice_reboots_once(fleet, proxy, observer):
    p = fleet.device("rb1", telemetry_interval=0.5, broker=FAST)
    observer.wait(lambda m: _online_boots(observer, "rb1") == [1], 15, "boot 1 online")
    # The PUBACK of the command is lost on the way (and the device reboots anyway): the
    # broker redelivers it, with DUP, to the next boot.
    proxy.blackhole(direction="up")
    observer.publish("devices/rb1/cmd/reboot", json.dumps({"id": "rb-1"}))
    p.wait_line("rb1 W rebooting on command", 10)
    proxy.blackhole(False)
    observer.wait(lambda m: 2 in _online_boots(observer, "rb1"), 20, "boot 2 online")
    observer.wait(lambda m: any(r["data"].get("duplicate") for r in _results(observer, "rb1",
                                                                            "reboot")),
                  15, "the redelivery answered as a duplicate")
    # The same request id sent again by an operator: not executed either.
    observer.publish("devices/rb1/cmd/reboot", json.dumps({"id": "rb-1"}))
    observer.wait(lambda m: len([r for r in _results(observer, "rb1", "reboot")
                                 if r["data"].get("duplicate")]) >= 2, 10, "second duplicate")
    time.sleep(1.5)
    assert max(_online_boots(observer, "rb1")) == 2, _online_boots(observer, "rb1")
    assert p.output().count("rebooting on command") == 1
    # A new request id does reboot; telemetry of every boot keeps its seqs complete.
    observer.publish("devices/rb1/cmd/reboot", json.dumps({"id": "rb-2"}))
    observer.wait(lambda m: 3 in _online_boots(observer, "rb1"), 20, "boot 3 online")
    tel = observer.json("devices/rb1/telemetry")
    for boot in (1, 2):
        seqs = sorted({t["seq"] for t in tel if t["boot"] == boot})
        assert seqs == list(range(1, len(seqs) + 1)), (boot, seqs)


def test_health_is_published_with_sane_fields_and_logs_come_back(fleet, observer):
    p = fleet.device("h1", telemetry_interval=0.5, health_interval=1, broker=FAST)
    observer.wait(lambda m: len(observer.json("devices/h1/health")) >= 2, 15, "two health")
    h = observer.json("devices/h1/health")[-1]
    assert h["v"] == 1 and h["boot"] == 1 and h["up"] >= 0
    assert 0 < h["heap_alloc"] and 0 < h["heap_free"]
    assert h["mqtt"]["connects"] == 1 and h["mqtt"]["connect_failures"] == 0
    assert h["outbox"]["dropped"] == 0 and h["outbox"]["queued"] >= 0
    assert 0 <= h["loop_lag_max_ms"] < 1000
    assert abs(h["ts"] - time.time()) < 60
    assert h["reset_cause"] == "power-on" and h["prev_up_s"] is None and h["safe_mode"] is False
    assert 0 < h["heap_largest_free"] <= h["heap_free"]
    assert h["tasks"] == {"restarts": {}, "unhandled": 0, "watchdog_starved": 0}, h["tasks"]
    assert h["link"] == {"joins": 1, "join_failures": 0, "losses": 0} and h["rssi"] < 0
    observer.publish("devices/h1/cmd/logs", json.dumps({"id": "l-1", "n": 5}))
    observer.wait(lambda m: _results(observer, "h1", "logs"), 10, "logs result")
    r = _results(observer, "h1", "logs")[0]
    assert r["id"] == "l-1" and r["status"] == "ok"
    lines = r["data"]["lines"]
    assert 1 <= len(lines) <= 5 and all(l.startswith("h1 ") for l in lines)
    p.wait_line(re.escape(lines[-1]))  # the runner may not have read the console that far
    assert "\n".join(lines) in p.output(), "the ring holds the console's lines, in order"
    observer.publish("devices/h1/cmd/logs", json.dumps({"id": "l-2", "n": 40}))
    observer.wait(lambda m: len(_results(observer, "h1", "logs")) >= 2, 10, "logs result")
    lines = _results(observer, "h1", "logs")[1]["data"]["lines"]
    assert any("I connected (session present: 0" in l for l in lines), lines


def test_reported_goes_out_once_per_content_and_its_cache_field_follows_the_flash(
        fleet, observer):
    # A fresh device, retained layers waiting: its connect's once-per-boot report and the
    # reports of the arriving layers must not send the same document twice.
    desired(observer, "fleet/all/config/desired", 2, log_level="debug")
    desired(observer, "fleet/model-x/config/desired", 3, health_interval=60)
    desired(observer, "devices/f1/config/desired", 1, telemetry_interval=0.3)
    fleet.device("f1", groups=["model-x"], broker=FAST)
    wait_reported(observer, "f1", lambda r: r["versions"] == {"all": 2, "model-x": 3,
                                                              "device": 1}, "every layer")
    # A second copy would follow within milliseconds: telemetry (every 0.3 s) is the clock.
    n = len(observer.json("devices/f1/telemetry"))
    observer.wait(lambda m: len(observer.json("devices/f1/telemetry")) >= n + 4, 15,
                  "telemetry after the layers")
    sent = [p for _, t, p, _ in observer.messages if t == "devices/f1/config/reported"]
    assert all(a != b for a, b in zip(sent, sent[1:])), sent
    assert len(sent) <= 4, sent  # the connect's, then at most one per layer
    docs = [json.loads(p) for p in sent]
    # Once a layer was cached, the report says so; before, the flash had no cache yet.
    assert all(d["cache"] == ("ok" if d["versions"] else "missing") for d in docs), docs


def test_a_refresh_renews_the_command_subscription_of_a_session_the_broker_claims(
        fleet, proxy, broker, observer):
    # amqtt answers session-present 1 for a session it does not have; a device then never
    # subscribes to its commands. Here mosquitto really holds a session for the device's id
    # without the command subscription: made by another client with that id.
    import paho.mqtt.client as mqtt

    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sp1", clean_session=False)
    c.on_subscribe = lambda *a: ready.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.subscribe([("fleet/all/config/desired", 1), ("devices/sp1/config/desired", 1)])
    assert ready.wait(10)
    c.disconnect()
    c.loop_stop()
    p = fleet.device("sp1", refresh_interval=4, telemetry_interval=5, broker=FAST)
    p.wait_line(r"sp1 I connected \(session present: 1", 15)
    sent = []  # (request id, when the broker had it)
    answered = set()
    end = time.monotonic() + 30
    while not answered and time.monotonic() < end:
        rid = "p%d" % len(sent)
        observer.publish("devices/sp1/cmd/ping", json.dumps({"id": rid}))
        sent.append((rid, time.monotonic()))
        try:
            observer.wait(lambda m: [r for r in _results(observer, "sp1", "ping")
                                     if r["id"] == rid], 0.3, "answer")
            answered.add(rid)
        except AssertionError:
            pass
    assert answered, "no command answered within 30 s"
    subs = [pk for pk in proxy.packets if pk.type == "SUBSCRIBE" and pk.dir == UP]
    assert subs, "no refresh"
    # Nothing subscribed at the connect; the refresh renewed the commands with the config.
    assert sorted(subs[0].filters) == ["devices/sp1/cmd/+", "devices/sp1/config/desired",
                                       "fleet/all/config/desired"], subs[0].filters
    suback = [pk for pk in proxy.packets if pk.type == "SUBACK" and pk.pid == subs[0].pid][0]
    results = {r["id"] for r in _results(observer, "sp1", "ping")}
    for rid, t in sent:
        if t < subs[0].t:
            assert rid not in results, (rid, "answered before the refresh")
        elif t > suback.t:
            assert rid in results, (rid, "not answered after the refresh")
    assert p.output().count("connected (session present") == 1
