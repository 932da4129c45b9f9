"""Chaos suite, faults (issue 9): real Unix-port devices against a real mosquitto, with the
broker restarted, the network partitioned, black-holed and slowed (testbed/proxy.py), the
device SIGKILLed while it drains its backlog, its flash full, its wall clock jumping.

Every scenario checks the same things afterwards:
- no telemetry lost that the device's own `dropped` counter does not explain
  (testbed/ledger.py), and never two different messages under one (boot, seq), which a
  consumer deduplicating by (device, boot, seq) would silently throw away;
- duplicates are allowed (at least once): counted and reported, not failed;
- the device recovers by itself: telemetry arrives again after the fault is removed
  (recovery time: from the removal to the first telemetry at the observer; caught up:
  until everything produced before the removal has arrived).

Each scenario reports a row through the `chaos_report` fixture (tests/conftest.py);
`make chaos` writes the rows to bench/chaos.json and testbed/chaos_table.py renders them.
The short variants run in `make test` (but for a broker restart and a black hole, which
test_device.py and test_session.py cover there already); everything marked `chaos` runs in
`make chaos` only.
"""
import json
import re
import subprocess
import time

import pytest

from testbed.devices import ROOT, Spec, micropython_path
from testbed.ledger import Ledger
from testbed.observer import Observer
from testbed.proxy import FaultProxy

# Reconnect settings of every scenario: the policy of the firmware, scaled down so that a
# scenario takes seconds (the defaults wait up to 5 s before the first attempt, and only a
# connection of 30 s resets the backoff).
RECONNECT = {"first_window": 1, "base": 0.5, "cap": 4, "stable_s": 2}
FAST = {"keepalive": 5, "timeout": 3, "reconnect": RECONNECT}
# Longest wait from a fault's removal to telemetry: a retry sleeping its longest (cap), a
# connect step timing out, the first window, and slack for a busy two-core machine.
RECOVERY_BOUND_S = RECONNECT["cap"] + FAST["timeout"] + RECONNECT["first_window"] + 4


# ---- measuring a scenario --------------------------------------------------------------


class Scenario:
    """One scenario's bookkeeping: when faults were injected and removed, the telemetry the
    observer saw from its devices, and the report row."""

    def __init__(self, report, name, variant, injected, observer, devices):
        self.observer = observer
        self.topics = {"devices/%s/telemetry" % d for d in devices}
        self.windows = []  # {"on", "off" (monotonic), "off_wall" (time.time())}
        self.t0 = time.monotonic()
        self.row = {"name": name, "variant": variant, "injected": injected,
                    "devices": len(devices), "ok": False}
        report.append(self.row)

    def inject(self):
        self.windows.append({"on": time.monotonic(), "off": None, "off_wall": None})

    def remove(self):
        w = self.windows[-1]
        w["off"] = time.monotonic()
        w["off_wall"] = time.time()

    def messages(self):
        """[(arrival, device, message)] of the scenario's devices, in arrival order."""
        with self.observer.cond:
            raw = [(t, topic, p) for t, topic, p, _ in self.observer.messages
                   if topic in self.topics]
        return [(t, topic.split("/")[-2], json.loads(p)) for t, topic, p in raw]

    def count(self):
        with self.observer.cond:
            return sum(1 for m in self.observer.messages if m[1] in self.topics)

    def seqs(self, device=None):
        """{(device, boot): set of seqs} received."""
        out = {}
        for _, dev, m in self.messages():
            if device is None or dev == device:
                out.setdefault((dev, m["boot"]), set()).add(m["seq"])
        return out

    def wait(self, cond, timeout, what):
        """Block until cond() (called on every new message) is truthy."""
        return self.observer.wait(lambda m: cond(), timeout, what)

    def wait_recovered(self, timeout=RECOVERY_BOUND_S + 20):
        """Block until telemetry arrives after the last removal; returns that delay (s)."""
        off = self.windows[-1]["off"]
        topics = self.topics
        t = self.observer.wait(
            lambda m: next((x[0] for x in m if x[0] > off and x[1] in topics), None),
            timeout, "telemetry after the fault was removed")
        return t - off

    def wait_caught_up(self, timeout=30):
        """Block until a message produced after the last removal has arrived: telemetry is
        delivered oldest first, so everything produced before it has arrived too."""
        off_wall = self.windows[-1]["off_wall"]
        self.wait(lambda: any(m.get("ts", 0) > off_wall for _, _, m in self.messages()),
                  timeout, "telemetry produced after the fault was removed (caught up)")

    def figures(self):
        """Ledger figures over everything received so far."""
        led = Ledger()
        first = {}  # (device, boot, seq) -> (arrival, up, ts) of its first arrival
        conflicts = 0
        for t, dev, m in self.messages():
            key = (dev, m["boot"], m["seq"])
            if key in first and first[key][1] != m.get("up"):
                conflicts += 1  # same key, another message: a dedup would lose it
            first.setdefault(key, (t, m.get("up"), m.get("ts")))
            led.telemetry(dev, m, now=t)
        recovery, caught_up = [], []
        for w in self.windows:
            if w["off"] is None:
                continue
            after = [v[0] for v in first.values() if v[0] > w["off"]]
            recovery.append(round(min(after) - w["off"], 2) if after else None)
            # Produced before the removal (device clock = host clock here), arrived after.
            late = [v[0] for v in first.values()
                    if v[0] > w["off"] and v[2] is not None and v[2] <= w["off_wall"]]
            caught_up.append(round(max(late) - w["off"], 2) if late else 0.0)
        return {
            "sent": sum(max(s) for s in led.seen.values()),
            "received": len(first),
            "received_total": led.received,
            "lost": led.gaps() + conflicts,
            "conflicts": conflicts,
            "dropped": sum(led.dropped.values()),
            "duplicates": led.duplicates - conflicts,
            "recovery_s": max((r for r in recovery if r is not None), default=None),
            "recovery_s_each": recovery,
            "caught_up_s": max(caught_up, default=None),
            "faults": len(self.windows),
        }

    def finish(self, **extra):
        """Fill the report row; returns it for the test's assertions."""
        self.row.update(self.figures())
        self.row.update(extra)
        self.row["duration_s"] = round(time.monotonic() - self.t0, 1)
        return self.row

    def passed(self):
        self.row["ok"] = True


def assert_no_unexplained_loss(row):
    assert row["conflicts"] == 0, ("two messages under one (boot, seq)", row)
    assert row["lost"] == 0, ("telemetry lost that no drop counter explains", row)


def assert_contiguous(sc):
    """Within each boot, seqs run 1..max without holes beyond the device's drops (the
    ledger's rule), checked here per boot so the failure names it."""
    figures = sc.figures()
    if figures["dropped"]:
        return
    for key, seqs in sc.seqs().items():
        missing = sorted(set(range(1, max(seqs) + 1)) - seqs)
        assert not missing, (key, missing[:20])


@pytest.fixture
def obs(broker):
    """An observer with a kept session (fixed id, clean=False) that reconnects quickly:
    across a broker restart, what the devices publish meanwhile is queued for it."""
    o = Observer(broker.host, broker.port, topics=("devices/#",), client_id="chaos-observer",
                 clean=False, reconnect=(0.1, 0.5))
    yield o
    o.close()


def _boot_of(process, device):
    line = process.wait_line(r"%s I boot \d+" % re.escape(device), 15)[-1]
    return int(line.split(" boot ")[1].split(",")[0])


# ---- the proxy's bandwidth cap ---------------------------------------------------------


def test_proxy_bandwidth_cap_paces_each_direction(tmp_path):
    """bandwidth(B): bytes go through at about B per second in each direction, and the cap
    lifted, at full speed again (an echo server upstream: both directions capped)."""
    import socket
    import threading

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def echo():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(
                lambda: c.recv(4096), b"")], daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()

    def roundtrip(proxy, n):
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
            t = time.monotonic()
            s.sendall(b"x" * n)
            got = 0
            while got < n:
                got += len(s.recv(65536))
            return time.monotonic() - t

    try:
        with FaultProxy("127.0.0.1", ls.getsockname()[1], record=False) as proxy:
            assert roundtrip(proxy, 20000) < 0.5
            proxy.bandwidth(4000)
            took = roundtrip(proxy, 4000)
            # 4000 bytes at 4000 B/s: one second per direction, pipelined, so about 1 s
            # plus a tenth for the last chunk of the way back.
            assert 0.85 <= took <= 2.0, took
            proxy.bandwidth(None)
            assert roundtrip(proxy, 20000) < 0.5
    finally:
        ls.close()


def test_chaos_table_renders_the_report(tmp_path):
    from testbed import chaos_table

    row = {"name": "partition", "variant": "short", "injected": "cut | refuse 3 s",
           "sent": 36, "received": 36, "lost": 0, "dropped": 2, "duplicates": 1,
           "recovery_s": 2.291, "caught_up_s": None, "ok": True}
    path = tmp_path / "chaos.json"
    path.write_text(json.dumps({"generated": "now", "cpus": 2,
                                "scenarios": [row, dict(row, variant="long", ok=False)]}))
    lines = chaos_table.render(json.loads(path.read_text())).splitlines()
    assert lines[0].startswith("| scenario | injected |") and len(lines) == 4
    assert lines[2] == ("| partition (short) | cut / refuse 3 s | 36 / 36 | 0 / 2 | 1 | "
                        "2.29 s | - | pass |")
    assert lines[3].endswith("| **FAIL** |")
    assert len(chaos_table.render(json.loads(path.read_text()), "long").splitlines()) == 3
    assert chaos_table.main([str(tmp_path / "missing.json")]) == 2


# ---- 1. broker restarts ----------------------------------------------------------------


def _broker_restarts(fleet, broker, obs, report, variant, restarts, down_s, up_s):
    dev = "br-" + variant
    sc = Scenario(report, "broker-restarts", variant,
                  "%d mosquitto restarts (SIGTERM, persistence on), down %.0f s, up %.0f s"
                  % (restarts, down_s, up_s), obs, [dev])
    p = fleet.device(dev, telemetry_interval=0.2, broker=FAST)
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    for _ in range(restarts):
        sc.inject()
        broker.stop()  # mosquitto writes its persistence file on SIGTERM
        time.sleep(down_s)
        broker.start()
        sc.remove()
        sc.wait_recovered()
        time.sleep(up_s)
    time.sleep(1)
    row = sc.finish(reconnects=len(re.findall(r"%s I connected \(session present: 1" % dev,
                                              p.output())))
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    assert row["reconnects"] >= restarts, "every restart resumed the kept session: %r" % row
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    assert row["received"] >= 5 * (restarts * (down_s + up_s)), row
    assert p.alive() and "Traceback" not in p.output()
    sc.passed()


@pytest.mark.chaos  # make test has one restart already (test_device.py)
def test_broker_restarts_short(fleet, broker, obs, chaos_report):
    _broker_restarts(fleet, broker, obs, chaos_report, "short", 2, 1.0, 2.5)


@pytest.mark.chaos
def test_broker_restarts_long(fleet, broker, obs, chaos_report):
    _broker_restarts(fleet, broker, obs, chaos_report, "long", 5, 3.0, 8.0)


# ---- 2. partition and black hole -------------------------------------------------------


def _partition_for(sc, proxy, seconds):
    """The proxy cuts every connection and refuses new ones for `seconds`, recorded in the
    scenario as one fault window."""
    sc.inject()
    proxy.refuse()
    proxy.cut()
    time.sleep(seconds)
    proxy.refuse(False)
    sc.remove()


def _partition(fleet, proxy, observer, report, variant, outage_s):
    dev = "pt-" + variant
    sc = Scenario(report, "partition", variant,
                  "proxy cuts every connection and refuses new ones for %.0f s" % outage_s,
                  observer, [dev])
    p = fleet.device(dev, telemetry_interval=0.2, broker=FAST)
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    _partition_for(sc, proxy, outage_s)
    sc.wait_recovered()
    sc.wait_caught_up()
    time.sleep(1)
    row = sc.finish(refused=len(proxy.attempts_since((0, 0, 0), "refused")))
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    assert row["dropped"] == 0, row
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    assert p.alive()
    sc.passed()


def _blackhole(fleet, proxy, observer, report, variant, hole_s, keepalive):
    dev = "bh-" + variant
    sc = Scenario(report, "blackhole", variant,
                  "proxy drops every byte both ways, no FIN or RST, for %.0f s "
                  "(keepalive %d s)" % (hole_s, keepalive), observer, [dev])
    broker = dict(FAST, keepalive=keepalive)
    p = fleet.device(dev, telemetry_interval=0.2, broker=broker)
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    sc.inject()
    t0 = time.monotonic()
    proxy.blackhole()
    p.wait_line(dev + " W no traffic from broker", 1.5 * keepalive + 5)
    detected = time.monotonic() - t0
    time.sleep(max(0.0, hole_s - detected))
    proxy.blackhole(False)  # also closes the connections that lost bytes
    sc.remove()
    sc.wait_recovered()
    sc.wait_caught_up()
    time.sleep(1)
    row = sc.finish(detected_s=round(detected, 2))
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    # Silence for 1.5 x keepalive means dead, checked every keepalive / 4 (at most 1 s).
    assert detected <= 1.5 * keepalive + min(1, keepalive / 4) + 1.5, row
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    assert p.alive()
    sc.passed()


def test_partition_short(fleet, proxy, observer, chaos_report):
    _partition(fleet, proxy, observer, chaos_report, "short", 3)


@pytest.mark.chaos  # make test has a black hole already (test_session.py)
def test_blackhole_short(fleet, proxy, observer, chaos_report):
    _blackhole(fleet, proxy, observer, chaos_report, "short", 5, 2)


@pytest.mark.chaos
def test_partition_long(fleet, proxy, observer, chaos_report):
    _partition(fleet, proxy, observer, chaos_report, "long", 30)


@pytest.mark.chaos
def test_blackhole_long(fleet, proxy, observer, chaos_report):
    _blackhole(fleet, proxy, observer, chaos_report, "long", 30, 5)


# ---- 3. slow link ----------------------------------------------------------------------


def _slow_link(fleet, proxy, observer, report, variant, slow_s, latency, bw, interval):
    """A link slower than the telemetry: the backlog grows, the in-flight window stays full,
    and a command and a config change must still be handled on it (an inbound handler
    that waited for room in a full window wedged the connection: found here)."""
    dev = "sl-" + variant
    sc = Scenario(report, "slow-link", variant,
                  "%.0f s of %d ms latency and %d B/s each way (telemetry every %.2f s), "
                  "a command and a config change meanwhile"
                  % (slow_s, latency * 1000, bw, interval), observer, [dev])
    p = fleet.device(dev, telemetry_interval=interval, broker=FAST, health_interval=1)
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    sc.inject()
    proxy.latency(latency)
    proxy.bandwidth(bw)
    n0 = sc.count()
    time.sleep(min(3, slow_s / 2))  # the backlog builds up, the window fills
    t = time.monotonic()
    observer.publish("devices/%s/cmd/ping" % dev, json.dumps({"id": "slow-1"}))
    observer.publish("devices/%s/config/desired" % dev,
                     json.dumps({"version": 1, "health_interval": 5}), retain=True)
    observer.wait(lambda m: observer.json("devices/%s/cmd/ping/result" % dev), slow_s + 10,
                  "the command's result over the slow link")
    answered = time.monotonic() - t
    p.wait_line(dev + " I config from device changed health_interval", 5)
    time.sleep(max(0.0, slow_s - (time.monotonic() - sc.windows[-1]["on"])))
    during = sc.count() - n0
    proxy.latency(0)
    proxy.bandwidth(None)
    sc.remove()
    sc.wait_recovered()
    slow = sc.windows[-1]["off"] - sc.windows[-1]["on"]  # the command may have taken longer
    produced = slow / interval
    sc.wait_caught_up()
    time.sleep(1)
    row = sc.finish(delivered_while_slow=during, command_answered_s=round(answered, 2),
                    slow_s=round(slow, 1),
                    keepalive_timeouts=p.output().count("no traffic from broker"))
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    assert row["dropped"] == 0, row
    # It kept flowing, slowly: not an outage.
    assert 0 < during < produced, row
    # Behind at most a window of telemetry (16 x ~110 B) at the capped rate, the proxy's
    # latency per chunk it forwards, and slack.
    assert answered <= 16 * 110 / bw + 16 * latency + 5, row
    assert row["keepalive_timeouts"] == 0, row
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    assert p.alive()
    sc.passed()


def test_slow_link_short(fleet, proxy, observer, chaos_report):
    _slow_link(fleet, proxy, observer, chaos_report, "short", 6, 0.2, 600, 0.1)


@pytest.mark.chaos
def test_slow_link_long(fleet, proxy, observer, chaos_report):
    _slow_link(fleet, proxy, observer, chaos_report, "long", 40, 0.5, 400, 0.1)


# ---- 4. SIGKILL loop during the drain of an offline backlog ----------------------------


SPILL_MS = 1000
# What the `offline` policy may lose at a power cut (README "Offline queue"): what was
# produced in the last spill_ms + one 250 ms tick; plus slack for a busy machine.
WINDOW_S = SPILL_MS / 1000 + 0.25 + 0.5


def _kill_loop(fleet, proxy, observer, report, variant, outage_s, kills, bw, tmp_path):
    dev = "kd-" + variant
    image = str(tmp_path / (dev + ".img"))
    common = dict(broker=FAST, outbox={"spill_ms": SPILL_MS},
                  # Every boot here is short by design: not a crash loop for safe mode.
                  safe_mode={"boots": 1000})
    busy = fleet.config(dev, telemetry_interval=0.05, **common)
    calm = fleet.config(dev, telemetry_interval=1, **common)
    sc = Scenario(report, "sigkill-drain", variant,
                  "%.0f s offline at 20 msg/s, then %d SIGKILLs during the drain over a "
                  "%d B/s link" % (outage_s, kills, bw), observer, [dev])
    p = fleet.start(Spec(image, config=busy))
    p.wait_line(dev + r" I connected", 15)
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    sc.inject()
    proxy.refuse()
    proxy.cut()
    time.sleep(outage_s)
    proxy.bandwidth(bw)
    proxy.refuse(False)
    # (boot, time.time() of its boot line, of its kill, boot-1 messages received at the kill)
    lives = []
    boot, started = 1, None
    for i in range(kills):
        p.wait_line(dev + r" I connected", 20)
        n0 = sc.count()
        sc.wait(lambda: sc.count() >= n0 + 5, 20, "drain progress before kill %d" % (i + 1))
        time.sleep(1.0 + 0.8 * (i % 3))
        killed = time.time()
        p.proc.kill()
        p.proc.wait()
        lives.append((boot, started, killed, len(sc.seqs().get((dev, 1), ()))))
        if i == kills - 1:
            # The last start: the link at full speed again. What the proxy still holds of
            # the killed process arrives after this too, so recovery is taken at the
            # proxy: the first PUBLISH on the new process's connection.
            proxy.bandwidth(None)
            mark = proxy.mark()
            old = max((pk.conn for pk in proxy.packets), default=0)
            sc.remove()
        p = fleet.start(Spec(image, config=calm))
        boot = _boot_of(p, dev)
        started = time.time()
    p.wait_line(dev + r" I connected", 20)
    sc.wait_recovered()
    # The telemetry that ended wait_recovered may be the killed process's, still held by
    # the slow proxy: the new process's first PUBLISH can come after it, so wait for it.
    first_new = None
    end = time.monotonic() + 20
    while first_new is None and time.monotonic() < end:
        first_new = next((pk.t for pk in proxy.packets_since(mark, "PUBLISH", "up")
                          if pk.conn > old), None)
        time.sleep(0.05)
    assert first_new is not None, "no PUBLISH from the last process in 20 s"

    def unsent():
        """Per killed boot: seconds before its kill that its first message missing at the
        consumer was produced (the one after the newest that arrived, one interval later;
        or its boot reading, taken at once). At most the loss window: nothing older lost."""
        seqs = sc.seqs()
        ts = {(m["boot"], m["seq"]): m["ts"] for _, _, m in sc.messages()}
        out = {}
        for b, started, killed, _ in lives:
            got = seqs.get((dev, b))
            if got:
                at = ts[(b, max(got))] + (busy if b == 1 else calm)["telemetry_interval"]
            else:
                at = started
            out[b] = round(killed - at, 2)
        return out

    try:
        sc.wait(lambda: max(unsent().values()) <= WINDOW_S, 30,
                "every killed boot's messages older than the loss window")
    except AssertionError:
        pass  # reported below with the figures
    time.sleep(1)
    missing = unsent()
    row = sc.finish(kills=kills, boots=len(sc.seqs()), loss_window_s=WINDOW_S,
                    first_missing_before_kill_s=missing,
                    life_s={b: round(k - s, 2) if s else None for b, s, k, _ in lives})
    row["recovery_s"] = round(first_new - sc.windows[-1]["off"], 2)
    row["recovery_s_each"] = [row["recovery_s"]]
    row["recovery_at"] = "proxy: first PUBLISH of the last process"
    # A boot's newest messages are no gap to the ledger: those produced before the window
    # and missing are lost all the same (about one per interval).
    beyond = sum(int((t - WINDOW_S) / (busy if b == 1 else calm)["telemetry_interval"]) + 1
                 for b, t in missing.items() if t > WINDOW_S)
    row["lost"] += beyond
    row["lost_beyond_window"] = beyond
    boot1 = len(sc.seqs()[(dev, 1)])
    # Each kill came during the drain: the outage's backlog was not all there yet.
    assert all(n < boot1 for _, _, _, n in lives), (lives, boot1)
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    for b, t in missing.items():
        # Only messages newer than the window may have gone with a kill.
        assert t <= WINDOW_S, ("boot", b, "lost more than the window", row)
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    sc.passed()


def test_sigkill_during_drain_short(fleet, proxy, observer, chaos_report, tmp_path):
    _kill_loop(fleet, proxy, observer, chaos_report, "short", 4, 2, 1500, tmp_path)


@pytest.mark.chaos
def test_sigkill_during_drain_long(fleet, proxy, observer, chaos_report, tmp_path):
    _kill_loop(fleet, proxy, observer, chaos_report, "long", 15, 8, 1500, tmp_path)


# ---- 5. full flash ---------------------------------------------------------------------


# Fills a board's flash image from the Unix port (same littlefs as the board): first the
# data blocks (appends that each either fit whole or fail), then the root directory's
# metadata with small files, so that creating any file fails too; `leave` bytes of a
# reserve file are deleted at the end to leave that much room.
FILL = r'''
import sys
sys.path.insert(0, %(root)r)
from firmware.boards.unix import open_flash
bdev, fs = open_flash(%(image)r, %(size)d)
if %(leave)d:
    with fs.open("/reserve", "wb") as f:
        f.write(b"r" * %(leave)d)
n = 0
for chunk in (4096, 512, 64, 8, 1):
    while True:
        try:
            with fs.open("/filler", "ab") as f:
                f.write(b"x" * chunk)
            n += chunk
        except OSError:
            break
k = 0
while True:
    try:
        with fs.open("/f%%d" %% k, "w") as f:
            f.write("y")
        k += 1
    except OSError:
        break
if %(leave)d:
    fs.remove("/reserve")
print("FILLED", n, k)
'''


def fill_flash(image, size, leave=0):
    r = subprocess.run([micropython_path(), "-c", FILL % {
        "root": ROOT, "image": image, "size": size, "leave": leave}],
        capture_output=True, text=True, timeout=60)
    assert "FILLED" in r.stdout, r.stdout + r.stderr
    return r.stdout.split()[1:]


def _full_flash(fleet, proxy, observer, report, variant, outage_s, leave, tmp_path):
    dev = "ff-" + variant
    image = str(tmp_path / (dev + ".img"))
    size = 65536
    cfg = fleet.config(dev, telemetry_interval=0.05, broker=FAST, health_interval=1,
                       outbox={"ram_bytes": 2048}, safe_mode={"boots": 1000})
    sc = Scenario(report, "full-flash", variant,
                  "flash image (64 KiB) filled%s; %.0f s offline at 20 msg/s; SIGKILL and "
                  "reboot on the full flash; a config change" % (
                      " but %d KiB" % (leave // 1024) if leave else "", outage_s),
                  observer, [dev])
    p = fleet.start(Spec(image, config=cfg), flash_size=size)
    p.wait_line(dev + r" I connected", 15)
    p.stop()  # a graceful stop leaves the image consistent for the filler
    fill_flash(image, size, leave)
    # No files put this time: nothing can be written to the image any more.
    p = fleet.start(Spec(image), flash_size=size)
    boot2 = _boot_of(p, dev)
    p.wait_line(dev + r" I connected", 15)
    sc.wait(lambda: sc.seqs().get((dev, boot2)), 15, "telemetry of the boot on a full flash")
    # Offline for outage_s, and at least until the RAM ring overflows (a busy machine's
    # device produced less than the ring holds in 3 s once).
    sc.inject()
    proxy.refuse()
    proxy.cut()
    time.sleep(outage_s)
    p.wait_line(dev + r" W outbox: full, dropping", 60)
    proxy.refuse(False)
    sc.remove()
    sc.wait_recovered()
    # A config change: applied although its cache cannot be written.
    observer.publish("devices/%s/config/desired" % dev,
                     json.dumps({"version": 1, "telemetry_interval": 0.1}), retain=True)
    p.wait_line(dev + r" I config from device changed telemetry_interval", 10)
    # The outbox's failed flash writes reported before the power cut (health every ~1 s;
    # a fixed second here missed it once).
    observer.wait(lambda m: [h for h in observer.json("devices/%s/health" % dev)
                             if h["boot"] == boot2 and h["outbox"]["flash_errors"] > 0],
                  30, "health reporting that the outbox hit the full flash")
    # A power cut on the full flash, and the boot after it.
    p.proc.kill()
    p.proc.wait()
    p = fleet.start(Spec(image), flash_size=size)
    boot3 = _boot_of(p, dev)
    sc.wait(lambda: len(sc.seqs().get((dev, boot3), ())) >= 5, 20, "telemetry after the reboot")
    time.sleep(1)
    out = "\n".join(proc.output() for proc in fleet.procs)
    (tmp_path / "devices.log").write_text(out)
    health = [h for h in observer.json("devices/%s/health" % dev) if h["boot"] == boot2]
    flash_errors = max((h["outbox"]["flash_errors"] for h in health), default=0)
    row = sc.finish(boots=[1, boot2, boot3], flash_errors=flash_errors,
                    write_errors=len(re.findall(r" E (outbox: flash write failed|boot record "
                                                r"not|config cache write failed)", out)))
    assert_no_unexplained_loss(row)
    assert boot3 > boot2 > 1, ("boot numbers must not repeat", row)
    assert "Traceback" not in out and p.alive(), out[-3000:]
    assert row["dropped"] > 0 and flash_errors > 0, ("the outbox hit the full flash", row)
    if not leave:
        assert "config cache write failed" in out, "the cache write must have failed"
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    sc.passed()


def test_full_flash_short(fleet, proxy, observer, chaos_report, tmp_path):
    _full_flash(fleet, proxy, observer, chaos_report, "short", 3, 0, tmp_path)


@pytest.mark.chaos
def test_full_flash_long(fleet, proxy, observer, chaos_report, tmp_path):
    _full_flash(fleet, proxy, observer, chaos_report, "long", 15, 12288, tmp_path)


# ---- 6. wall clock jumps ---------------------------------------------------------------


def _clock_jumps(fleet, proxy, observer, report, variant, jumps, hold_s, tmp_path):
    """The Unix board's wall clock (unix_time: `ts` of telemetry and health) jumps by the
    control file's clock= word; everything that times (telemetry schedule, keepalive,
    backoff, the outbox's spill) runs on ticks and must not notice. A partition while the
    clock is a day behind checks the reconnect backoff too."""
    dev = "cj-" + variant
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    interval = 0.2
    sc = Scenario(report, "clock-jumps", variant,
                  "wall clock jumps %s, %.0f s each; a 2 s partition while a day behind"
                  % (", ".join("%+d s" % j for j in jumps), hold_s), observer, [dev])
    cfg = fleet.config(dev, telemetry_interval=interval, broker=FAST, health_interval=1)
    p = fleet.start(Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl)))
    sc.wait(lambda: sc.count() >= 5, 15, "telemetry")
    spans = []  # [shift, wall time set, wall time replaced]
    for j in jumps:
        ctl.write_text("clock=%+d" % j)
        t = time.time()
        if spans:
            spans[-1][2] = t
        spans.append([j, t, None])
        time.sleep(hold_s)
        if j == -86400:
            _partition_for(sc, proxy, 2)
            sc.wait_recovered()
            time.sleep(1)
    ctl.write_text("")
    spans[-1][2] = time.time()
    time.sleep(1)
    # Arrival wall time of each message's first copy (the observer keeps monotonic times).
    to_wall = time.time() - time.monotonic()
    first = {}
    for t, _, m in sc.messages():
        first.setdefault((m["boot"], m["seq"]), (t + to_wall, m))
    # The device clock followed each jump (so the rest means something): a message that
    # arrived well inside a shift's span, promptly, carries ts = its arrival time + shift.
    followed = {j for j, a, b in spans
                if any(a + 0.5 < w < b - 0.2 and abs(m["ts"] - w - j) < 1.0
                       for w, m in first.values())}
    ordered = [first[k][1] for k in sorted(first)]
    ups = [m["up"] for m in ordered]
    # Arrival gaps outside the partition: the telemetry schedule runs on ticks.
    arrivals = sorted(t - to_wall for t, _ in first.values())
    outs = [(w["on"] - 0.5, w["off"] + RECOVERY_BOUND_S) for w in sc.windows]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])
            if not any(lo <= a <= hi for lo, hi in outs)]
    health = observer.json("devices/%s/health" % dev)
    row = sc.finish(jumps_s=jumps, max_arrival_gap_s=round(max(gaps), 2),
                    keepalive_timeouts=max((h["mqtt"]["keepalive_timeouts"] for h in health),
                                           default=None),
                    connects=max((h["mqtt"]["connects"] for h in health), default=None))
    row["caught_up_s"] = None  # ts is shifted on purpose: "produced before" is unknown
    assert followed == set(jumps), (followed, row)
    assert_no_unexplained_loss(row)
    assert_contiguous(sc)
    assert ups == sorted(ups), "up (ticks) runs forward whatever the wall clock does"
    assert row["max_arrival_gap_s"] < 5 * interval + 1, row
    # Connections: the first and one after each partition; no keepalive false alarm.
    assert row["keepalive_timeouts"] == 0, row
    assert row["connects"] == 1 + len(sc.windows), row
    assert row["recovery_s"] <= RECOVERY_BOUND_S, row
    assert p.alive()
    sc.passed()


def test_clock_jumps_short(fleet, proxy, observer, chaos_report, tmp_path):
    _clock_jumps(fleet, proxy, observer, chaos_report, "short", [3600, -86400], 2, tmp_path)


@pytest.mark.chaos
def test_clock_jumps_long(fleet, proxy, observer, chaos_report, tmp_path):
    _clock_jumps(fleet, proxy, observer, chaos_report, "long",
                 [3600, -86400, 86400 * 365, -3600 * 5, 30], 6, tmp_path)
