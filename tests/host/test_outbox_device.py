"""The outbox end to end: real Unix-port devices, a real mosquitto behind the fault proxy.
Telemetry produced while the broker is unreachable is kept (RAM, then flash), survives
SIGKILL, and arrives once the link is back: nothing missing beyond the documented window
of the `offline` policy and the drops the device counted."""
import random
import signal
import time

from testbed.devices import Spec

FAST = {"reconnect": {"first_window": 0.3, "base": 0.3, "cap": 2, "flap_limit": 100}}


def _seqs(observer, dev):
    by_boot = {}
    for m in observer.json("devices/%s/telemetry" % dev):
        by_boot.setdefault(m["boot"], set()).add(m["seq"])
    return by_boot


def test_telemetry_during_an_outage_is_delivered_in_order_when_the_link_returns(
        fleet, proxy, observer):
    p = fleet.device("o1", telemetry_interval=0.05, broker=FAST)
    observer.wait(lambda m: len(observer.json("devices/o1/telemetry")) >= 5, 15, "telemetry")
    proxy.refuse()
    proxy.cut()
    time.sleep(4)  # about 80 messages, moved to flash while the link is down
    cut_seen = len(observer.json("devices/o1/telemetry"))
    proxy.refuse(False)
    p.wait_line(r"o1 I connected \(session present: 1", 15)
    observer.wait(lambda m: len(observer.json("devices/o1/telemetry")) >= cut_seen + 70, 15,
                  "the backlog")
    time.sleep(0.5)
    msgs = observer.json("devices/o1/telemetry")
    firsts = []
    seen = set()
    for m in msgs:
        if m["seq"] not in seen:
            seen.add(m["seq"])
            firsts.append(m["seq"])
    assert firsts == sorted(firsts), "delivered in order"
    assert firsts == list(range(1, firsts[-1] + 1)), "no seq missing"
    assert not any("dropped" in m for m in msgs)


def test_sigkill_loop_during_an_outage_loses_nothing_outside_the_window(
        fleet, proxy, observer, tmp_path):
    """Killed 50 times at random moments while the broker is unreachable, then brought back:
    every message older than the loss window of the `offline` policy at its kill arrives."""
    rnd = random.Random(7)
    image = str(tmp_path / "k1.img")
    spill_ms = 100
    cfg = fleet.config("k1", telemetry_interval=0.05, broker=FAST,
                       outbox={"spill_ms": spill_ms},
                       # Every boot here is short by design: not a crash loop to act on.
                       safe_mode={"boots": 1000})
    lives = []  # (boot, unix time its boot line appeared, unix time of the kill)
    p = fleet.start(Spec(image, config=cfg))
    p.wait_line(r"k1 I connected", 15)
    proxy.refuse()
    proxy.cut()
    for i in range(50):
        if i:
            p = fleet.start(Spec(image))
        line = p.wait_line(r"k1 I boot \d+", 10)[0]
        started = time.time()
        boot = int(line.split("boot ")[1].split(",")[0])
        time.sleep(rnd.uniform(0.2, 1.2))
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()
        lives.append((boot, started, time.time()))
    proxy.refuse(False)
    p = fleet.start(Spec(image))
    p.wait_line(r"k1 I connected", 15)
    # Offline, a record reaches flash at the first 250 ms tick after it has waited spill_ms:
    # that is the window; plus slack for process scheduling on a busy machine.
    window = spill_ms / 1000 + 0.25 + 0.3
    must = [b for b, started, killed in lives if killed - started > window + 0.15]
    assert len(must) >= 10, "the kills must give many boots time to reach flash"
    observer.wait(lambda m: set(must) <= set(_seqs(observer, "k1")), 30,
                  "telemetry of every boot that outlived the window")
    time.sleep(1)
    msgs = observer.json("devices/k1/telemetry")
    ts = {(m["boot"], m["seq"]): m["ts"] for m in msgs}
    by_boot = _seqs(observer, "k1")
    for boot, started, killed in lives:
        seqs = by_boot.get(boot, set())
        if not seqs:
            assert boot not in must
            continue
        top = max(seqs)
        assert sorted(seqs) == list(range(1, top + 1)), (boot, "gap")
        # Only the newest messages, those within the window at the kill, may be missing.
        assert killed - ts[(boot, top)] <= window, (boot, killed - ts[(boot, top)])
