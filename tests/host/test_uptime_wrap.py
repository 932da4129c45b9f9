"""Days of uptime in seconds: a device whose ticks behave as a board's (2^30 ms period,
ticks_diff spanning half of it) is driven 9.3 days ahead, past a wrap and past what
ticks_diff spans, while it stays connected through a real broker. Uptime, keepalive,
the connection's length (and so the backoff after it) and the boot history must all be
right; on the 64-bit port without the emulation none of this could be seen."""
import json
import re

from testbed.devices import Spec

STEP = 1 << 28  # 3.1 days: each step within what a board's ticks_diff spans
FAST = {"keepalive": 4, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}


def _health(observer, dev):
    return observer.json("devices/%s/health" % dev)


def _up_at_least(observer, dev, s):
    return [h for h in _health(observer, dev) if h["up"] >= s]


def test_nine_days_of_driven_ticks_keep_uptime_keepalive_backoff_and_history_right(
        fleet, observer, proxy, tmp_path):
    dev = "wrap1"
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    cfg = fleet.config(dev, broker=FAST, telemetry_interval=0.5, health_interval=0.5)
    spec = Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl))
    p = fleet.start(spec, ticks_before_wrap=1)
    online = lambda m: [s for s in observer.json("devices/%s/status" % dev)
                        if s["state"] == "online"]
    observer.wait(online, 15, "online")
    # The ticks have wrapped by now (1 s after the start); the link keeps working.
    observer.wait(lambda m: _up_at_least(observer, dev, 2), 15, "health after the wrap")
    for k in (1, 2, 3):
        ctl.write_text("ticks=%d" % (k * STEP))
        # The next step only once every loop of the device has looked at the ticks (the
        # slowest, the watchdog's, every 2 s): two steps unseen in between would be 2^29,
        # more than a board's ticks_diff spans, which no board's clock can do.
        seen = observer.wait(lambda m: _up_at_least(observer, dev, k * STEP // 1000), 20,
                             "uptime past %d steps" % k)[0]["up"]
        observer.wait(lambda m: _up_at_least(observer, dev, seen + 5), 30,
                      "5 s more after %d steps" % k)
    days = 3 * STEP / 1000
    h = _up_at_least(observer, dev, days)[0]
    assert h["up"] < days + 60, h  # no wrap, no double count
    observer.wait(lambda m: [t for t in observer.json("devices/%s/telemetry" % dev)
                             if t["up"] >= days * 1000], 20, "telemetry with 9 days of uptime")
    seqs = [t["seq"] for t in observer.json("devices/%s/telemetry" % dev)]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    out = p.output()
    # Still the first connection: the driven days were not the broker's silence, and no
    # task was judged hung for them.
    assert len(online(None)) == 1, out
    assert "keepalive" not in out and "missed its check-in" not in out, out
    assert not p.resets
    # The connection has lasted 9.3 days: its end counts as stable, so the retry comes
    # from the first window (0.5 s), not from a grown one.
    proxy.cut()
    line = p.wait_line(dev + r" \S+ link lost after", 20)[0]
    m = re.search(r"link lost after ([0-9.]+) s; reconnect in ([0-9.]+) s", line)
    assert m and days <= float(m.group(1)) < days + 60, line
    assert float(m.group(2)) <= 0.5, line
    observer.wait(lambda m: len(online(None)) >= 2, 20, "back online")
    # A link that goes silent after the wrap is still found dead within 1.5 x keepalive.
    proxy.blackhole(True)
    p.wait_line(dev + r" W no traffic from broker for 1.5 x keepalive", 20)
    proxy.blackhole(False)
    observer.wait(lambda m: len(online(None)) >= 3, 20, "online after the black hole")
    # The boot history keeps the 9 days: a graceful stop saves the uptime, the next boot
    # reports it.
    p.stop()
    p2 = fleet.start(spec, ticks_before_wrap=1)
    observer.wait(lambda m: [s for s in online(None) if s["boot"] == 2], 20, "boot 2 online")
    birth = [s for s in online(None) if s["boot"] == 2][0]
    assert days <= birth["prev_up_s"] < days + 120, birth
    p2.stop()
