"""The application API end to end (README "Writing your application"): real Unix-port
devices running a test app (tests/data/apps/probe) against a real mosquitto. Its sensors
fail in every way a driver can, its commands run once, its settings go through the twin's
validator, its events survive an outage and a power cut, its state survives a broker that
lost it, and an app that does not start leaves a device that says why."""
import json
import os
import time

from testbed.devices import ROOT, Spec
from testbed.observer import Observer

PROBE = os.path.join(ROOT, "tests", "data", "apps", "probe")
FAST = {"reconnect": {"first_window": 0.3, "base": 0.3, "cap": 2, "flap_limit": 100}}


def _app_dir(tmp_path, name, source):
    d = tmp_path / name
    d.mkdir()
    (d / "__init__.py").write_text(source)
    return str(d)


def _start(fleet, tmp_path, dev, app=PROBE, **over):
    cfg = fleet.config(dev, **over)
    return fleet.start(Spec(str(tmp_path / (dev + ".img")), config=cfg, app=app))


def _health(observer, dev, pred, what):
    def found(_):
        for h in observer.json("devices/%s/health" % dev):
            if "app" in h and pred(h["app"]):
                return h["app"]
        return None
    return observer.wait(found, 30, what)


def _cmd(observer, dev, name, body):
    observer.publish("devices/%s/cmd/%s" % (dev, name), json.dumps(body))


def _result(observer, dev, name, rid):
    def got(_):
        for r in observer.json("devices/%s/cmd/%s/result" % (dev, name)):
            if r["id"] == rid:
                return r
        return None
    return observer.wait(got, 15, "result of %s %s" % (name, rid))


def test_sensors_that_raise_hang_or_return_garbage_are_counted_and_left_out(
        fleet, observer, tmp_path):
    p = _start(fleet, tmp_path, "s1", telemetry_interval=0.3, health_interval=5)
    observer.wait(lambda m: len(observer.json("devices/s1/telemetry")) >= 8, 30, "telemetry")
    tel = observer.json("devices/s1/telemetry")
    for m in tel:
        assert "stuck" not in m and "garbage" not in m
        assert m["good"] == {"a": 1, "on": True}
    # Every third read of `flaky` raises: its field is missing from exactly those messages.
    flaky = [m.get("flaky") for m in tel]
    assert None in flaky and [v for v in flaky if v is not None], flaky
    assert all(v % 3 for v in flaky if v is not None), flaky
    # `slow` is sampled on its own schedule; its last value rides along.
    assert [m for m in tel[2:] if m.get("slow") == 7]
    # A report from after flaky's third read (reads counts those that returned): one from
    # between the second and third ticks has the stuck sensor's two timeouts and no error yet.
    app = _health(observer, "s1", lambda a: a["sensors"]["stuck"]["timeouts"] >= 2
                  and a["sensors"]["flaky"]["reads"] >= 3,
                  "health with the stuck sensor's timeouts, after flaky's third read")
    s = app["sensors"]
    assert s["flaky"]["errors"] >= 1 and "bus error" in s["flaky"]["last_error"]
    assert s["garbage"]["errors"] >= 1 and "list" in s["garbage"]["last_error"]
    assert s["stuck"]["last_error"].startswith("no value within 300 ms")
    assert s["good"]["errors"] == 0 and s["good"]["reads"] >= 1
    assert app["loaded"] is True and app["error"] is None
    # The device goes on: no task died, the watchdog never fired.
    assert not p.resets
    h = observer.json("devices/s1/health")[-1]
    assert h["tasks"]["restarts"] == {} and h["tasks"]["watchdog_starved"] == 0


def test_an_app_command_runs_once_across_a_redelivery_and_a_reboot(fleet, observer, tmp_path):
    p = _start(fleet, tmp_path, "c1")
    p.wait_line(r"c1 I connected", 15)
    _cmd(observer, "c1", "bump", {"id": "r-1", "k": 2})
    assert _result(observer, "c1", "bump", "r-1")["data"] == {"runs": 1}
    _cmd(observer, "c1", "bump", {"id": "r-1", "k": 2})  # a redelivery
    observer.wait(lambda m: len(observer.json("devices/c1/cmd/bump/result")) >= 2, 15, "dup")
    assert observer.json("devices/c1/cmd/bump/result")[1]["data"] == {"duplicate": True}
    _cmd(observer, "c1", "reboot", {"id": "b-1"})
    p.wait_line(r"c1 I boot 2,", 30)
    p.wait_line(r"c1 I connected", 15, count=2)
    _cmd(observer, "c1", "bump", {"id": "r-1", "k": 2})  # again, after the reboot
    observer.wait(lambda m: len(observer.json("devices/c1/cmd/bump/result")) >= 3, 15, "dup 2")
    assert observer.json("devices/c1/cmd/bump/result")[2]["data"] == {"duplicate": True}
    # The handler got the body without the request's id, and ran exactly once.
    assert len([l for l in p.lines if "bump ran with" in l]) == 1
    assert "{'k': 2}" in p.output()
    # A handler that raises answers an error and is counted; the device goes on.
    _cmd(observer, "c1", "fail", {"id": "f-1"})
    r = _result(observer, "c1", "fail", "f-1")
    assert r["status"] == "error" and r["data"]["error"] == "fail asked for it"
    _cmd(observer, "c1", "report", {"id": "rep"})
    app = _health(observer, "c1", lambda a: a["commands"]["errors"] == 1, "the counted error")
    assert app["commands"]["handled"] >= 1


def test_app_settings_are_validated_reported_and_applied_live(fleet, observer, tmp_path):
    p = _start(fleet, tmp_path, "t1")
    p.wait_line(r"t1 I connected", 15)
    observer.publish("devices/t1/config/desired",
                     json.dumps({"version": 2, "app": {"threshold": 500}}), retain=True)
    rep = observer.wait(lambda m: [r for r in observer.json("devices/t1/config/reported")
                                   if r.get("rejections")], 15, "the rejection")[-1]
    assert "app.threshold must be in 0..100" in rep["rejections"][-1]["reason"]
    assert rep["effective"]["app.threshold"] == 50
    for n, bad in enumerate(({"threshold": "high"}, {"threshold": True}, {"mode": "turbo"}),
                            start=2):
        observer.publish("devices/t1/config/desired", json.dumps({"version": 3, "app": bad}),
                         retain=True)
        observer.wait(lambda m, n=n: [r for r in observer.json("devices/t1/config/reported")
                                      if r["rejected"] >= n], 15, "refusal %d" % n)
    observer.publish("devices/t1/config/desired",
                     json.dumps({"version": 4, "app": {"threshold": 61.5, "mode": "boost",
                                                       "nosuch": 1}}), retain=True)
    rep = observer.wait(lambda m: [r for r in observer.json("devices/t1/config/reported")
                                   if r["effective"].get("app.threshold") == 61.5], 15,
                        "the new value")[-1]
    assert rep["source"]["app.threshold"] == "device"
    assert rep["unknown"] == {"device": ["app.nosuch"]}
    assert rep["rejected"] == 4
    p.wait_line(r"t1 I app: threshold now 61.5", 10)
    # The ticker task reads the live values: mode boost makes it send events with them.
    ev = observer.wait(lambda m: observer.json("devices/t1/event/beat"), 10, "beat events")
    assert ev[-1]["data"] == {"threshold": 61.5}
    # Cached on flash: the next boot starts with them before any network.
    _cmd(observer, "t1", "reboot", {"id": "b"})
    p.wait_line(r"t1 I boot 2,", 30)
    p.wait_line(r"t1 I app: threshold now 61.5", 10, count=2)


def test_events_survive_an_outage_and_a_power_cut_without_a_gap(fleet, proxy, observer,
                                                                 tmp_path):
    src = ("import asyncio\n"
           "def setup(dev):\n"
           "    async def produce():\n"
           "        i = 0\n"
           "        while True:\n"
           "            dev.beat(1000)\n"
           "            i += 1\n"
           "            dev.event('count', {'i': i})\n"
           "            await asyncio.sleep(0.1)\n"
           "    dev.task(produce, 'produce')\n")
    app = _app_dir(tmp_path, "counter", src)
    cfg = fleet.config("e1", broker=FAST, outbox={"policy": "always"},
                       safe_mode={"boots": 100})
    p = fleet.start(Spec(str(tmp_path / "e1.img"), config=cfg, app=app), restart=True)
    observer.wait(lambda m: len(observer.json("devices/e1/event/count")) >= 10, 20, "events")
    proxy.refuse()
    proxy.cut()
    t = time.monotonic()
    p.wait_line(r"e1 I link lost after", 20)
    seen = len(observer.json("devices/e1/event/count"))
    # A 40 s outage with a power cut in the middle of it.
    while time.monotonic() - t < 20:
        time.sleep(0.5)
    p.power_cut()
    p.wait_line(r"e1 I boot 2,", 30)
    while time.monotonic() - t < 40:
        time.sleep(0.5)
    assert len(observer.json("devices/e1/event/count")) == seen, "nothing got through"
    proxy.refuse(False)
    p.wait_line(r"e1 I connected", 30, count=2)

    def complete(_):
        by_boot = {}
        for e in observer.json("devices/e1/event/count"):
            by_boot.setdefault(e["boot"], set()).add(e["seq"])
        if 1 not in by_boot or 2 not in by_boot or len(by_boot[2]) < 10:
            return None
        return by_boot
    by_boot = observer.wait(complete, 60, "both boots' events")
    time.sleep(1)  # late duplicates would show here; a gap cannot close any more
    for boot, seqs in by_boot.items():
        assert seqs == set(range(1, max(seqs) + 1)), "boot %d has gaps" % boot
    # Boot 1 produced events during the outage (about 20 s of them; how many depends on
    # the host's load, as every one is written to flash): all of them arrived.
    assert max(by_boot[1]) >= seen + 20
    assert not any("dropped" in e for e in observer.json("devices/e1/event/count"))


def test_state_is_republished_after_the_broker_lost_it(fleet, broker, observer, tmp_path):
    p = _start(fleet, tmp_path, "st1", broker=FAST)
    p.wait_line(r"st1 I connected", 15)
    _cmd(observer, "st1", "bump", {"id": "1"})
    observer.wait(lambda m: [s for s in observer.json("devices/st1/state")
                             if s["state"].get("bumps") == 1], 15, "state")
    observer.close()
    broker.restart()  # SIGKILL: retained messages gone
    p.wait_line(r"st1 I connected", 30, count=2)
    late = Observer(broker.host, broker.port, topics=("devices/st1/state",))
    try:
        doc = late.wait(lambda m: late.json("devices/st1/state"), 15, "retained state")[-1]
        assert doc["state"] == {"mode": "eco", "bumps": 1}
        assert [m for m in late.matching("devices/st1/state") if m[3]], "retained"
    finally:
        late.close()


def test_an_app_that_does_not_start_leaves_a_device_that_says_why(fleet, observer, tmp_path):
    shadow = _app_dir(tmp_path, "shadow", "def setup(dev):\n"
                                          "    dev.sensor('x', lambda: 1)\n"
                                          "    dev.command('reboot', None)\n")
    p = _start(fleet, tmp_path, "f1", app=shadow, telemetry_interval=0.5, health_interval=5)
    p.wait_line(r"f1 E app not started: setup: .*command 'reboot' is built in", 15)
    st = observer.wait(lambda m: [s for s in observer.json("devices/f1/status")
                                  if s.get("state") == "online"], 15, "online")[-1]
    assert st["app"]["loaded"] is False and "built in" in st["app"]["error"]
    app = _health(observer, "f1", lambda a: True, "health")
    assert app["loaded"] is False and "built in" in app["error"]
    # The device runs without it: telemetry, commands.
    observer.wait(lambda m: len(observer.json("devices/f1/telemetry")) >= 2, 15, "telemetry")
    assert not any("x" in m for m in observer.json("devices/f1/telemetry"))
    _cmd(observer, "f1", "ping", {"id": "p"})
    assert _result(observer, "f1", "ping", "p")["status"] == "ok"
    # An app whose import fails is reported the same way.
    broken = _app_dir(tmp_path, "broken", "import no_such_module\n")
    p2 = _start(fleet, tmp_path, "f2", app=broken)
    p2.wait_line(r"f2 E app not started: import: ImportError", 15)
    st = observer.wait(lambda m: [s for s in observer.json("devices/f2/status")
                                  if s.get("state") == "online"], 15, "online")[-1]
    assert "no_such_module" in st["app"]["error"]


def test_a_device_without_an_app_publishes_as_before(fleet, observer):
    p = fleet.device("n1", telemetry_interval=0.5, health_interval=5)
    observer.wait(lambda m: observer.json("devices/n1/health"), 20, "health")
    st = [s for s in observer.json("devices/n1/status") if s.get("state") == "online"]
    assert st and "app" not in st[-1]
    assert "app" not in observer.json("devices/n1/health")[-1]
    assert set(observer.json("devices/n1/telemetry")[-1]) <= {
        "v", "seq", "boot", "up", "ts", "temp_c", "dropped"}
    assert "app" not in p.output()
