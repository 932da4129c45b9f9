"""The supervisor on a real broker with real Unix-port devices: a hung task ends in a
watchdog reset by the runner (testbed/devices.py) with the queue intact, a crash loop ends in
safe mode and comes out of it, a link outage is recovered end to end, a graceful stop loses
nothing."""
import json
import time

from testbed.devices import Spec

FAST = {"keepalive": 5, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}


def _statuses(observer, dev):
    return observer.json("devices/%s/status" % dev)


def _seqs(observer, dev, boot):
    return sorted({m["seq"] for m in observer.json("devices/%s/telemetry" % dev)
                   if m["boot"] == boot})


def _device(fleet, tmp_path, dev, will_delay_s=None, **over):
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    b = FAST if will_delay_s is None else dict(FAST, will_delay_s=will_delay_s)
    cfg = fleet.config(dev, broker=b, **over)
    return Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl)), ctl


def _online(observer, dev, boot):
    return [s for s in _statuses(observer, dev) if s["state"] == "online" and s["boot"] == boot]


def _hang_resets_with_cause_watchdog(fleet, observer, tmp_path, dev, hang):
    spec, ctl = _device(fleet, tmp_path, dev, telemetry_interval=0.2, watchdog_ms=1500)
    p = fleet.start(spec, on_watchdog=lambda image: ctl.write_text(""))
    observer.wait(lambda m: _online(observer, dev, 1), 15, "online")
    # An outage first, so the queue holds messages that only flash can carry over the reset.
    ctl.write_text("link-down")
    p.wait_line(dev + r" W network link lost", 10)
    time.sleep(2)
    ctl.write_text("link-down " + hang)
    p.wait_line(r"runner: watchdog reset of .*%s\.img" % dev, 20)
    observer.wait(lambda m: _online(observer, dev, 2), 20, "boot 2 online")
    assert p.resets == [spec.image]
    birth = _online(observer, dev, 2)[0]
    assert birth["cause"] == "watchdog" and birth["prev_up_s"] is not None, birth
    # Every reading taken before the hang arrives: the outbox spilled them to flash.
    observer.wait(lambda m: len(_seqs(observer, dev, 1)) >= 10 and _seqs(observer, dev, 2), 20,
                  "boot 1 backlog and boot 2 telemetry")
    time.sleep(1)
    seqs = _seqs(observer, dev, 1)
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return p


def test_a_task_stuck_on_an_await_stops_the_feeding_and_the_runner_resets(
        fleet, observer, tmp_path):
    p = _hang_resets_with_cause_watchdog(fleet, observer, tmp_path, "wd1", "hang-await")
    assert "watchdog: task telemetry missed its check-in" in p.output()


def test_a_busy_loop_stops_the_feeding_and_the_runner_resets(fleet, observer, tmp_path):
    _hang_resets_with_cause_watchdog(fleet, observer, tmp_path, "wd2", "hang-busy")


def test_a_crash_loop_ends_in_safe_mode_and_a_healthy_period_ends_it(
        fleet, observer, tmp_path):
    spec, ctl = _device(fleet, tmp_path, "sm1", telemetry_interval=0.2,
                        safe_mode={"boots": 3, "short_boot_s": 30, "healthy_s": 4})
    ctl.write_text("crash")  # every telemetry reading raises: the task keeps dying
    p = fleet.start(spec)
    observer.wait(lambda m: _online(observer, "sm1", 4), 60, "boot 4 online")
    for boot in (2, 3):
        b = _online(observer, "sm1", boot)[0]
        assert b["cause"] == "crash" and "safe_mode" not in b, b
    safe = _online(observer, "sm1", 4)[0]
    assert safe["safe_mode"] is True and safe["cause"] == "crash", safe
    assert "task telemetry died 3 times" in p.output()
    ctl.write_text("")  # the fault is fixed while in safe mode
    # Safe mode publishes no telemetry; after healthy_s it reboots into normal mode.
    observer.wait(lambda m: _online(observer, "sm1", 5), 20, "boot 5 online")
    normal = _online(observer, "sm1", 5)[0]
    assert "safe_mode" not in normal and normal["cause"] == "soft", normal
    assert not _seqs(observer, "sm1", 4), "safe mode runs no telemetry"
    observer.wait(lambda m: len(_seqs(observer, "sm1", 5)) >= 3, 10, "telemetry again")
    # Commands work in safe mode's successor as always; the safe boot is in the history.
    observer.publish("devices/sm1/cmd/report", json.dumps({"id": "r-1"}))
    # A periodic health of an earlier boot may have gone out too (its first is at a random
    # moment): the one that answers is boot 5's.
    observer.wait(lambda m: [h for h in observer.json("devices/sm1/health") if h["boot"] == 5],
                  10, "health of boot 5")
    h = [h for h in observer.json("devices/sm1/health") if h["boot"] == 5][-1]
    assert h["safe_mode"] is False and h["reset_cause"] == "soft"


def test_safe_mode_keeps_what_was_queued_on_flash(fleet, observer, tmp_path):
    # Readings queued on flash during an outage, then a crash loop into safe mode, which
    # runs no outbox: once it ends, every queued reading of boot 1 is delivered.
    spec, ctl = _device(fleet, tmp_path, "sm2", telemetry_interval=0.2,
                        safe_mode={"boots": 2, "short_boot_s": 30, "healthy_s": 3})
    p = fleet.start(spec)
    observer.wait(lambda m: _online(observer, "sm2", 1), 15, "online")
    ctl.write_text("link-down")
    p.wait_line(r"sm2 W network link lost", 10)
    online_part = len(_seqs(observer, "sm2", 1))
    time.sleep(2)  # ~10 readings while offline
    ctl.write_text("link-down crash")
    p.wait_line(r"sm2 E safe mode", 60)
    ctl.write_text("")
    observer.wait(lambda m: [s for s in _statuses(observer, "sm2")
                             if s["state"] == "online" and not s.get("safe_mode")
                             and s["boot"] > 1], 30, "normal boot after safe mode")
    observer.wait(lambda m: len(_seqs(observer, "sm2", 1)) >= online_part + 5, 20,
                  "boot 1's queue delivered")
    time.sleep(1)
    seqs = _seqs(observer, "sm2", 1)
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_a_link_outage_queues_then_everything_recovers(fleet, observer, tmp_path):
    # will_delay_s 0: the will at once (MQTT 5 would hold it 30 s, for a quick return).
    spec, ctl = _device(fleet, tmp_path, "ln1", will_delay_s=0, telemetry_interval=0.2,
                        health_interval=1)
    p = fleet.start(spec)
    observer.wait(lambda m: _online(observer, "ln1", 1), 15, "online")
    ctl.write_text("link-down")
    p.wait_line(r"ln1 W network link lost: closing the connection", 10)
    # The broker saw the connection go without DISCONNECT: the last will says offline.
    observer.wait(lambda m: _statuses(observer, "ln1")[-1] == {"v": 1, "state": "offline"}, 10,
                  "last will")
    before = len(observer.json("devices/ln1/telemetry"))
    time.sleep(3)
    assert len(observer.json("devices/ln1/telemetry")) == before, "nothing sent while down"
    ctl.write_text("")
    observer.wait(lambda m: _statuses(observer, "ln1")[-1]["state"] == "online", 15, "back")
    observer.wait(lambda m: len(_seqs(observer, "ln1", 1)) >= before + 12, 30, "the backlog")
    seqs = _seqs(observer, "ln1", 1)
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    # The line may reach the runner after the messages reached the observer (two pipes).
    p.wait_line(r"ln1 I connected \(session present: 1", 10)  # the broker kept the session
    observer.wait(lambda m: any(h["link"]["losses"] == 1
                                for h in observer.json("devices/ln1/health")), 10, "health")
    h = [h for h in observer.json("devices/ln1/health") if h["link"]["losses"] == 1][-1]
    assert h["link"]["joins"] == 2 and h["mqtt"]["connects"] == 2


def test_graceful_stop_during_an_outage_loses_nothing(fleet, observer, tmp_path):
    spec, ctl = _device(fleet, tmp_path, "gs1", telemetry_interval=0.1)
    p = fleet.start(spec)
    observer.wait(lambda m: _online(observer, "gs1", 1), 15, "online")
    ctl.write_text("link-down")
    p.wait_line(r"gs1 W network link lost", 10)
    time.sleep(0.5)  # the newest readings are only in RAM (spill_ms is 1 s)
    p.stop()
    assert p.proc.returncode == 0, p.output()
    delivered = len(_seqs(observer, "gs1", 1))
    ctl.write_text("")
    p2 = fleet.start(Spec(spec.image, control=str(ctl)))
    line = p2.wait_line(r"gs1 I outbox: \d+ message", 10)[0]
    kept = int(line.split("outbox: ")[1].split()[0])
    observer.wait(lambda m: _online(observer, "gs1", 2), 15, "boot 2 online")
    observer.wait(lambda m: len(_seqs(observer, "gs1", 1)) >= delivered + kept, 10, "backlog")
    time.sleep(1)
    seqs = _seqs(observer, "gs1", 1)
    # Everything the stop put on flash arrives, and nothing before it is missing.
    assert kept >= 5 and seqs == list(range(1, delivered + kept + 1)), (delivered, kept, seqs)
    h = _online(observer, "gs1", 2)[0]
    assert h["prev_up_s"] is not None and h["cause"] == "power-on"
