"""Battery devices end to end (README "Battery devices"): duty-cycled boards on the Unix
port against a real mosquitto. A lone board's deep sleep ends its process and the runner
starts it again after the sleep (scaled), with its RTC memory kept; boards sharing a
process sleep inside it. Every reading is delivered once and in order across sleeps; a
wake costs one round trip for CONNACK and one for the PUBACKs, with no SUBSCRIBE."""
import json
import time

from test_ota import ota_device, ota_states, releases, request  # noqa: F401 (a fixture)
from testbed.devices import Spec
from testbed.proxy import round_trips

FAST = {"reconnect": {"first_window": 0.2, "base": 0.2, "cap": 1}}
# Wakes every 20 s of device time, 1 s of the test's at scale 0.05.
DUTY = {"mode": "duty", "wake_every_s": 20, "send_every": 1, "awake_max_s": 5}
SCALE = 0.05


def _seqs(observer, dev, boot=None):
    """Seqs of dev's telemetry in arrival order (of `boot`, or every boot's)."""
    return [t["seq"] for t in observer.json("devices/%s/telemetry" % dev)
            if boot is None or t["boot"] == boot]


def _sleeping(observer, dev):
    return [s for s in observer.json("devices/%s/status" % dev) if s["state"] == "sleeping"]


def _until(pred, timeout, what):
    """Poll a runner's state (no message says it) until pred() holds."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out waiting for " + what
        time.sleep(0.02)


def _duty(**over):
    d = dict(DUTY)
    d.update(over)
    return d


def test_a_sleeping_fleet_delivers_every_reading_once_in_order_and_hears_the_fleet_at_its_next_wake(
        fleet, observer, tmp_path):
    # Ten boards in one process (they sleep inside it), delivering every 3rd wake: the
    # readings of the other wakes wait in their RTC memory.
    ids = ["z%d" % i for i in range(10)]
    # No refresh or health report due in the run: the sending wakes are the rule's alone.
    specs = [fleet.spec(d, broker=FAST, power=_duty(send_every=3), health_interval=86400,
                        refresh_interval=604800) for d in ids]
    p = fleet.start(*specs, sleep_scale=SCALE)
    for d in ids:
        observer.wait(lambda m, d=d: len(_sleeping(observer, d)) >= 2, 60, "%s asleep" % d)
    # While they sleep: a config layer for one, a command for another (QoS 1, queued in
    # their kept sessions).
    observer.publish("devices/z1/config/desired",
                     json.dumps({"version": 4, "power.send_every": 2}), retain=True, qos=1)
    observer.publish("devices/z2/cmd/ping", json.dumps({"id": "asleep"}), qos=1)
    observer.wait(lambda m: [r for r in observer.json("devices/z1/config/reported")
                             if r["versions"].get("device") == 4], 30, "layer applied")
    observer.wait(lambda m: [r for r in observer.json("devices/z2/cmd/ping/result")
                             if r["id"] == "asleep" and r["status"] == "ok"], 30, "ping answered")
    # Ten minutes of device time (30 wakes) for every board.
    for d in ids:
        observer.wait(lambda m, d=d: len(_seqs(observer, d)) >= 30, 180, "%s: 30 readings" % d)
    for d in ids:
        got = _seqs(observer, d, boot=1)
        assert got == list(range(1, len(got) + 1)), (d, got)  # once each, in order, no gap
    # The first wake of a boot sends, then every 3rd; z1 every 2nd since its layer came.
    assert [s["wake"] % 3 for s in _sleeping(observer, "z0")[1:]] == [0] * (
        len(_sleeping(observer, "z0")) - 1)
    assert [s["wake"] % 2 for s in _sleeping(observer, "z1")[-2:]] == [0, 0]
    # Its wakes are wakes, not boots: one boot, its record never counted again.
    assert {s["boot"] for d in ids for s in _sleeping(observer, d)} == {1}
    assert "Traceback" not in p.output()


def test_a_wake_delivers_in_two_round_trips_without_subscribing(fleet, proxy, observer):
    p = fleet.start(fleet.spec("w1", broker=FAST, power=_duty(send_every=2)),
                    sleep_scale=SCALE)
    # Wake 1 (a boot) sends, then wakes 2, 4, 6, 8: the ones after 2 carry a kept reading.
    observer.wait(lambda m: len(_sleeping(observer, "w1")) >= 5, 60, "five sending wakes")
    assert p.sleeps and min(p.sleeps) > 0  # the process ended in a sleep request each time
    conns = sorted({pk.conn for pk in proxy.packets})
    assert len(conns) >= 5
    for c in conns[2:4]:  # wakes 4 and 6
        pks = [pk for pk in proxy.packets if pk.conn == c]
        ups = [pk.type for pk in pks if pk.dir == "up"]
        assert ups[0] == "CONNECT" and not pks[0].clean  # the kept session
        assert "SUBSCRIBE" not in ups and "PINGREQ" not in ups, ups
        assert ups[-1] == "DISCONNECT", ups
        # Two readings (this wake's and the kept one) and the status, in one flight.
        assert ups.count("PUBLISH") == 3, ups
        assert round_trips(pks) == 2, pks
    st = _sleeping(observer, "w1")[-1]
    assert 18 <= st["sleep_s"] <= 22 and st["next_wake"] > time.time()
    got = _seqs(observer, "w1")
    assert got == list(range(1, len(got) + 1))


def test_a_board_without_sleep_memory_keeps_its_readings_on_flash(fleet, observer, tmp_path):
    # As an RP2040: the state of the wakes is a flash file, and its writes are counted.
    cfg = fleet.config("f1", broker=FAST, power=_duty(send_every=3))
    p = fleet.start(Spec(str(tmp_path / "f1.img"), config=cfg, sleep_memory=False),
                    sleep_scale=SCALE)
    observer.wait(lambda m: len(_sleeping(observer, "f1")) >= 3, 60, "three sending wakes")
    got = _seqs(observer, "f1")
    assert got == list(range(1, len(got) + 1)) and len(got) >= 4, got
    st = _sleeping(observer, "f1")
    assert [s["wake"] % 3 for s in st[1:]] == [0] * (len(st) - 1)  # kept between them
    # One write per wake (and one per acknowledged kept reading's wake end), not per ack.
    assert 0 < st[-1]["state_flash_writes"] <= 2
    assert not (tmp_path / "f1.img.rtc").exists()
    assert "Traceback" not in p.output()


def test_a_power_cut_while_asleep_or_mid_wake_sends_nothing_twice(fleet, observer):
    p = fleet.start(fleet.spec("c1", broker=FAST, power=_duty()), sleep_scale=SCALE,
                    restart=True)
    observer.wait(lambda m: len(_sleeping(observer, "c1")) >= 2, 60, "asleep")
    _until(lambda: p._asleep, 30, "between wakes")
    assert p.power_cut()  # while asleep: the RTC memory goes with the power
    observer.wait(lambda m: [s for s in _sleeping(observer, "c1") if s["boot"] == 2], 60,
                  "the next boot")
    p.wait_line(r"c1 I boot 2, .*reset cause power-on", 5)
    # Mid-wake, or as good as: whatever it took is not acknowledged. (A wake can end just
    # before the cut: then the next one is cut.)
    _until(lambda: p.alive() and p.power_cut(), 30, "a cut while awake")
    assert "runner: power cut\n" in p.output() + "\n"
    observer.wait(lambda m: [s for s in _sleeping(observer, "c1") if s["boot"] == 3], 60,
                  "the boot after")
    for boot in (1, 2):
        got = _seqs(observer, "c1", boot)
        assert got == list(range(1, len(got) + 1)), (boot, got)  # no repeat, no hole
        last = [s["seq"] for s in _sleeping(observer, "c1") if s["boot"] == boot][-1]
        # Every reading its last status counted arrived (one taken after it may not have).
        assert got[-1] >= last


def test_a_broker_that_refuses_three_wakes_running_gets_every_reading_after(
        fleet, proxy, observer):
    p = fleet.start(fleet.spec("r1", broker=FAST, power=_duty(awake_max_s=2)),
                    sleep_scale=SCALE)
    observer.wait(lambda m: len(_sleeping(observer, "r1")) >= 1, 60, "first wake")
    proxy.refuse()
    p.wait_line(r"r1 W wake \d+: not delivered within 2 s \(3 failed wakes", 90)
    proxy.refuse(False)
    observer.wait(lambda m: [s for s in _sleeping(observer, "r1") if s["wake"] > 4], 60,
                  "delivered again")
    fails = [float(ln.rsplit("sleeping ", 1)[1].split()[0]) for ln in p.lines
             if "not delivered within" in ln]
    # Jittered within [T/2, 3T/2]: a fleet that failed together does not wake together.
    assert all(10 <= s <= 30 for s in fails) and len(set(fails)) > 1, fails
    got = _seqs(observer, "r1")
    assert got == list(range(1, len(got) + 1)) and len(got) >= 5, got


def test_a_wake_that_hangs_ends_in_a_watchdog_reset_and_the_next_wake(fleet, observer,
                                                                       tmp_path):
    ctl = tmp_path / "ctl"
    ctl.write_text("")
    # Every 2nd wake sends: a reading kept in the RTC memory lives through the reset.
    cfg = fleet.config("h1", broker=FAST, power=_duty(awake_max_s=2, send_every=2),
                       watchdog_ms=1000)
    p = fleet.start(Spec(str(tmp_path / "h1.img"), config=cfg, control=str(ctl)),
                    sleep_scale=SCALE, on_watchdog=lambda image: ctl.write_text(""))
    observer.wait(lambda m: len(_sleeping(observer, "h1")) >= 1, 60, "first wake")
    ctl.write_text("hang-await\n")  # the next wake's sensor read never returns
    p.wait_line(r"runner: watchdog reset of", 60)
    # The boot after the reset says why; the readings before it all arrived.
    b = observer.wait(lambda m: [s for s in _sleeping(observer, "h1") if s["boot"] == 2], 60,
                      "the wake after the reset")[0]
    assert b["cause"] == "watchdog"
    observer.wait(lambda m: len(_sleeping(observer, "h1")) > len(
        [s for s in _sleeping(observer, "h1") if s["boot"] == 1]) + 1, 60, "a second wake")
    got = _seqs(observer, "h1", boot=1)
    assert got == list(range(1, len(got) + 1)) and got  # once each, in order
    last = [s["seq"] for s in _sleeping(observer, "h1") if s["boot"] == 1][-1]
    assert got[-1] >= last


def test_a_command_keeps_a_sleeping_device_awake_and_it_sleeps_again_after(fleet, observer):
    p = fleet.start(fleet.spec("a1", broker=FAST, power=_duty()), sleep_scale=SCALE)
    observer.wait(lambda m: len(_sleeping(observer, "a1")) >= 1, 60, "asleep")
    observer.publish("devices/a1/cmd/stay-awake", json.dumps({"id": "s", "stay_awake_s": 3}),
                     qos=1)
    on = observer.wait(lambda m: [s for s in observer.json("devices/a1/status")
                                  if s["state"] == "online"], 60, "awake")[0]
    assert 0 < on["awake_s"] <= 3
    # Awake: a command is answered at once, before the wake's next `sleeping`.
    n = len(_sleeping(observer, "a1"))
    observer.publish("devices/a1/cmd/ping", json.dumps({"id": "now"}), qos=1)
    observer.wait(lambda m: len(_sleeping(observer, "a1")) > n, 30, "asleep again")
    order = [t for _, t, pl, _ in observer.messages
             if t == "devices/a1/cmd/ping/result" or (t == "devices/a1/status"
                                                      and b'"sleeping"' in pl)]
    assert order[n:n + 2] == ["devices/a1/cmd/ping/result", "devices/a1/status"], order
    assert "Traceback" not in p.output()


def test_an_update_asked_of_a_sleeping_device_keeps_its_next_wake_awake_until_confirmed(
        fleet, observer, tmp_path, releases):
    v2 = releases.build("v2", 2)
    p = fleet.start(ota_device(fleet, tmp_path, "u1", releases, power=_duty()),
                    sleep_scale=SCALE)
    observer.wait(lambda m: _sleeping(observer, "u1"), 60, "asleep on v1")
    n = len(p.sleeps)
    _until(lambda: len(p.sleeps) > n, 30, "between wakes")
    request(observer, v2, reboot="now")  # retained, and queued in its kept session
    observer.wait(lambda m: [s for s in ota_states(observer, "u1")
                             if s["state"] == "confirmed" and s["version"] == 2], 120,
                  "v2 confirmed")
    # It stayed awake for the update (no sleep between the request's wake and the
    # confirmation: the reset into v2 is a reset, not a sleep), then sleeps on v2.
    observer.wait(lambda m: [s for s in _sleeping(observer, "u1") if s["fw"] == "2.0.0"], 60,
                  "asleep on v2")
    assert "runner: board reset" in p.output()
    on = [s for s in observer.json("devices/u1/status") if s["state"] == "online"]
    assert on and on[-1]["fw"] == "2.0.0" and on[-1]["cause"] == "soft"


def test_leaving_duty_takes_a_reboot_and_loses_no_kept_reading(fleet, observer):
    p = fleet.start(fleet.spec("m1", broker=FAST, power=_duty(send_every=3)),
                    sleep_scale=SCALE)
    observer.wait(lambda m: len(_sleeping(observer, "m1")) >= 2, 60, "asleep")
    observer.publish("devices/m1/config/desired",
                     json.dumps({"version": 2, "power.mode": "always-on"}), retain=True)
    rep = observer.wait(lambda m: [r for r in observer.json("devices/m1/config/reported")
                                   if r["versions"].get("device") == 2], 60, "layer")[-1]
    assert rep.get("pending_reboot") == ["power.mode"]
    observer.publish("devices/m1/cmd/reboot", json.dumps({"id": "r"}), qos=1)
    b = observer.wait(lambda m: [s for s in observer.json("devices/m1/status")
                                 if s["state"] == "online" and s["boot"] == 2], 60,
                      "always on after the reboot")[0]
    assert b["cause"] == "soft"
    slept = len(p.sleeps)
    observer.wait(lambda m: len(_seqs(observer, "m1", boot=2)) >= 3, 30, "telemetry")
    assert len(p.sleeps) == slept  # always on: no sleep since
    # The readings boot 1 kept in its RTC memory arrived under their own numbers.
    got = _seqs(observer, "m1", boot=1)
    last = [s["seq"] for s in _sleeping(observer, "m1") if s["boot"] == 1][-1]
    assert sorted(got) == list(range(1, max(got) + 1)) and len(set(got)) == len(got)
    assert max(got) >= last
