"""testbed/sim.py as an operator runs it: its own broker, a fleet, a JSON summary at the end;
settings from the command line, a consumer that survives its own lost connection, power
cuts, a broker that requires a login."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from testbed.broker import Mosquitto
from testbed.devices import ROOT
from testbed.proxy import FaultProxy


# ---- a run that an operator watches and stops ------------------------------------------


class SimRun:
    """testbed/sim.py in the background, its output lines collected as they come."""

    def __init__(self, tmp_path, *args, env=None):
        self.lines = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--workdir", str(tmp_path),
             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait(self, pred, timeout, what):
        end = time.monotonic() + timeout
        with self.cond:
            while not pred(self.lines):
                left = end - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise AssertionError("sim: no %s; last lines:\n%s"
                                         % (what, "\n".join(self.lines[-30:])))
                self.cond.wait(min(left, 1.0))

    def wait_line(self, pattern, timeout=30, count=1):
        rx = re.compile(pattern)
        self.wait(lambda ls: len([l for l in ls if rx.search(l)]) >= count, timeout,
                  "%d line(s) matching %r" % (count, pattern))

    def finish(self):
        """Ctrl-C, as an operator stops it; returns the summary."""
        self.p.send_signal(signal.SIGINT)
        self.p.wait(60)
        with self.cond:
            assert self.p.returncode == 0, "\n".join(self.lines[-30:])
            return json.loads(self.lines[-1])

    def kill(self):
        """After a failed test: Ctrl-C first, so the sim stops its device processes (they
        run in sessions of their own and would outlive a SIGKILL of the sim)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def sim_run(tmp_path):
    runs = []

    def start(*args, **kw):
        runs.append(SimRun(tmp_path, *args, **kw))
        return runs[-1]

    yield start
    for r in runs:
        r.kill()


def _up(sim, dev, prefix="", telemetry=1):
    """Wait for dev's birth message and `telemetry` messages after it (the birth goes out
    beside the first reading, not always before it): what the summary's `online` needs."""
    head = "%sdevices/%s/" % (prefix, dev)

    def seen(ls):
        births = [i for i, l in enumerate(ls)
                  if l.startswith(head + "status {") and '"state": "online"' in l]
        return births and len([l for l in ls[births[0]:]
                               if l.startswith(head + "telemetry {")]) >= telemetry
    sim.wait(seen, 60, "%s online with %d telemetry" % (dev, telemetry))


def _tele(lines, dev):
    """seqs of dev's telemetry in the sim's output."""
    out = []
    for l in lines:
        if l.startswith("devices/%s/telemetry {" % dev):
            out.append(json.loads(l.split(" ", 1)[1])["seq"])
    return out


def test_sim_runs_a_fleet_and_prints_a_summary(tmp_path, sim_run):
    sim = sim_run("--devices", "4", "--interval", "0.5", "--processes", "2")
    for n in range(4):
        _up(sim, "sim-%04d" % n, telemetry=4)
    summary = sim.finish()
    assert summary["devices"] == 4 and summary["online"] == 4
    assert summary["telemetry"] >= 4 * 4
    assert summary["gaps"] == 0 and summary["duplicates"] == 0
    assert summary["memory_errors"] == 0 and summary["consumer_disconnects"] == 0
    assert any(l.startswith('devices/sim-0003/telemetry {"') for l in sim.lines), "prints"
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".img")]) == 4


def test_sim_rejects_bad_arguments(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--devices", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "--devices must be at least 1" in r.stderr


def test_sim_outages_and_health_give_heap_figures(sim_run):
    # 320k: the firmware compiled from source on the 64-bit port, MQTT 5 included, needs
    # about 288k (256k before it); a board's heap is measured on the board model (bench).
    # Two outages 4 s apart once both devices are online, through the sim's fault proxy; health
    # every ~0.5 s gives the heap figures. first_window 0.5 s and stable_s 1 s so that both
    # devices are back between the outages: with the default 30 s, connections of under 4 s
    # never count as stable and each outage's retry delays grow from the last one's (the
    # policy for a flapping link).
    sim = sim_run("--devices", "2", "--processes", "2", "--interval", "0.5",
                  "--outage-every", "4", "--outage-for", "1.5", "--outages", "2",
                  "--first-window", "0.5",
                  "--stable-s", "1", "--health-interval", "0.5", "--heapsize", "320k")
    sim.wait_line(r"^sim: outage 2 ", 90)
    # Both back after the second outage, telemetry flowing, health to fit a slope on.
    mark = len(sim.lines)
    for dev in ("sim-0000", "sim-0001"):
        sim.wait(lambda ls, d=dev: len(_tele(ls[mark:], d)) >= 2, 60, dev + " back")
        sim.wait(lambda ls, d=dev: len([l for l in ls[mark:]
                                        if l.startswith("devices/%s/health {" % d)]) >= 3,
                 60, dev + " health")
    summary = sim.finish()
    lines = sim.lines
    assert summary["gaps"] == 0 and summary["memory_errors"] == 0
    outages = [l for l in lines if l.startswith("sim: outage ")]
    assert len(outages) == 2 and summary["outages"] == 2, outages
    # Both devices were connected when the first outage cut, and both came back.
    assert summary["outage_cuts"] >= 2 and summary["reconnects"] >= 2
    births = [l for l in lines if "/status {" in l and '"online"' in l]
    assert len(births) >= 2 + 2, "a birth message per device and per reconnect"
    assert summary["heap_samples"] >= 10
    assert 16 * 1024 < summary["heap_min_bytes"] <= summary["heap_max_bytes"] < 320 * 1024
    assert isinstance(summary["heap_slope_bytes_per_hour"], float)
    assert not any("MemoryError" in l for l in lines)


def test_one_outage_may_outlast_its_period_and_storm_checks_the_summary():
    # `make storm`'s sim-outage (testbed/storm.py): one cut 5 s after the fleet is up,
    # refused for 20 s, which sim.py refuses for repeated outages (they would overlap).
    from testbed.sim import parse_args
    from testbed.storm import SimOutageRun, parse_args as storm_args, sim_outage_failures

    a = parse_args(["--outage-every", "5", "--outage-for", "20", "--outages", "1"])
    assert (a.outage_every, a.outage_for, a.outages) == (5, 20, 1)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--outage-every", "5",
         "--outage-for", "20", "--outages", "2"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--outage-for must be shorter" in r.stderr
    argv = SimOutageRun("sim-outage", "firmware", storm_args(["--devices", "1000"]), "/tmp",
                        lambda s: None).argv()
    assert argv[argv.index("--outage-every") + 1] == "5"
    assert argv[argv.index("--outage-for") + 1] == "20" and "--quiet" in argv
    good = {"sim_rc": 0, "devices": 4, "online": 4, "gaps": 0, "watchdog_resets": 0,
            "memory_errors": 0, "outages": 1, "outage_cuts": 4}
    assert sim_outage_failures(good, 4) == []
    # What the stalled run printed: devices missing, watchdog resets.
    bad = dict(good, online=3, watchdog_resets=4, gaps=2)
    assert sim_outage_failures(bad, 4) == ["3 of 4 devices online at the end", "gaps: 2",
                                           "watchdog_resets: 4"]
    assert sim_outage_failures(dict(good, sim_rc=1), 4) == ["sim.py exited with 1"]
    assert sim_outage_failures(dict(good, outage_cuts=2), 4)


# ---- settings from the command line ----------------------------------------------------


def test_set_parses_dotted_keys_and_json_values():
    from testbed.sim import parse_set, set_path

    doc = {"broker": {"host": "h", "keepalive": 30}}
    for text in ("broker.reconnect.first_window=2", "safe_mode.boots=10", "groups=[\"a\"]",
                 "prefix=site/", "broker.keepalive=7"):
        set_path(doc, *parse_set(text))
    assert doc == {"broker": {"host": "h", "keepalive": 7, "reconnect": {"first_window": 2}},
                   "safe_mode": {"boots": 10}, "groups": ["a"], "prefix": "site/"}
    for bad in ("novalue", "=1", "a..b=1", "device_id=x", "broker.host=x"):
        try:
            parse_set(bad)
        except ValueError:
            continue
        raise AssertionError("accepted %r" % bad)
    try:
        set_path(doc, "broker.keepalive.x", 1)
    except ValueError as e:
        assert "broker.keepalive is not an object" in str(e)
    else:
        raise AssertionError("set a key inside a number")


def test_sim_set_reaches_every_device_and_a_bad_one_stops_before_the_start(sim_run):
    # prefix through --set: the devices publish under it and the consumer follows it.
    sim = sim_run("--devices", "2", "--interval", "0.5", "--processes", "1",
                  "--set", "prefix=site7/", "--set", "broker.reconnect.first_window=0.5")
    for dev in ("sim-0000", "sim-0001"):
        _up(sim, dev, prefix="site7/")
    summary = sim.finish()
    assert summary["online"] == 2 and summary["telemetry"] >= 2 and summary["gaps"] == 0
    assert not [l for l in sim.lines if l.startswith("devices/")], "no topic without it"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--set", "watchdog_ms=5"],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid config: watchdog_ms must be in" in r.stderr
    assert "mosquitto on" not in r.stdout, "nothing started"


def test_a_sleeping_fleet_runs_in_the_sim_and_counts_as_up(sim_run):
    # Battery devices (README "Battery devices"), three boards in one process sleeping in it:
    # each says `sleeping` and delivers every 2nd wake, its readings in order.
    sim = sim_run("--devices", "3", "--processes", "1", "--set", "power.mode=duty",
                  "--set", "power.wake_every_s=20", "--set", "power.send_every=2",
                  "--sleep-scale", "0.05")
    for n in range(3):
        head = "devices/sim-%04d/" % n
        sim.wait(lambda ls, h=head: len([l for l in ls if l.startswith(h + "status {")
                                         and '"sleeping"' in l]) >= 3, 60, head + " asleep")
    summary = sim.finish()
    assert summary["online"] == 3 and summary["gaps"] == 0 and summary["duplicates"] == 0
    for n in range(3):
        got = _tele(sim.lines, "sim-%04d" % n)
        assert got == list(range(1, len(got) + 1)) and len(got) >= 4, got


def test_the_consumer_keeps_its_session_across_its_own_lost_connection(
        broker, observer, sim_run):
    # The devices publish to the broker; the consumer reads through a proxy (--observe)
    # that the test cuts while the devices go on. Its kept session holds what they publish
    # meanwhile: a clean session would lose it and print gaps that are not the devices'.
    cproxy = FaultProxy(broker.host, broker.port, record=False).start()
    try:
        sim = sim_run("--broker", "%s:%d" % (broker.host, broker.port),
                      "--observe", "%s:%d" % (cproxy.host, cproxy.port),
                      "--devices", "2", "--processes", "1", "--interval", "0.3",
                      "--set", "broker.reconnect.first_window=0.5")
        for dev in ("sim-0000", "sim-0001"):
            _up(sim, dev)
        cproxy.refuse(True)
        cproxy.cut()
        # The devices go on publishing while the consumer is away: seen on the broker.
        n = len(observer.matching("/telemetry"))
        observer.wait(lambda m: len(observer.matching("/telemetry")) >= n + 10, 20,
                      "telemetry while the consumer is away")
        last = {d: max(m["seq"] for m in observer.json("devices/%s/telemetry" % d))
                for d in ("sim-0000", "sim-0001")}
        cproxy.refuse(False)
        for dev, seq in last.items():
            sim.wait(lambda ls, d=dev, s=seq: s in _tele(ls, d), 30,
                     "%s seq %d at the consumer" % (dev, seq))
        summary = sim.finish()
    finally:
        cproxy.stop()
    assert summary["consumer_disconnects"] >= 1, summary
    assert summary["gaps"] == 0 and summary["online"] == 2, summary
    assert summary["telemetry"] >= sum(last.values())


def test_power_cuts_restart_the_devices_and_lose_nothing_acknowledged(sim_run):
    sim = sim_run("--devices", "2", "--processes", "2", "--interval", "0.3",
                  "--power-cut-every", "2", "--set", "broker.reconnect.first_window=0.5")
    sim.wait_line(r"^runner: power back after a restart", 60, count=2)
    sim.wait_line(r'/status \{.*"boot": 2', 30)
    summary = sim.finish()
    assert summary["power_cuts"] >= 2 and summary["restarts"] >= 2, summary
    assert summary["power_cuts"] - summary["restarts"] in (0, 1, 2), summary
    assert summary["gaps"] == 0 and "process_exits" not in summary, summary
    assert summary["watchdog_resets"] == 0, summary
    births = [json.loads(l.split(" ", 1)[1]) for l in sim.lines if "/status {" in l]
    assert [b for b in births if b.get("boot", 0) >= 2 and b.get("cause") == "power-on"
            and b["state"] == "online"], births


def test_sim_logs_in_to_a_broker_that_requires_it(tmp_path, sim_run):
    m = Mosquitto(tmp_path / "authbroker", passwords={"fleet": "s3cret-pw"}).start()
    try:
        sim = sim_run("--broker", "%s:%d" % (m.host, m.port), "--user", "fleet",
                      "--devices", "2", "--processes", "1", "--interval", "0.5",
                      "--set", "broker.reconnect.first_window=0.5",
                      env=dict(os.environ, SIM_PASSWORD="s3cret-pw"))
        for dev in ("sim-0000", "sim-0001"):
            _up(sim, dev)
        summary = sim.finish()
    finally:
        m.stop()
    assert summary["online"] == 2 and summary["telemetry"] >= 2, summary
    assert not [l for l in sim.lines if "s3cret-pw" in l]


def test_sim_brokers_in_priority_order_fail_over_and_the_consumer_reads_both(
        tmp_path, sim_run):
    # --broker twice: the devices get both as failover endpoints, the consumer reads both.
    # The primary stops: the devices move to the secondary and say so in their births; it
    # starts again (same port, its persistence kept): they return. Nothing is lost: what a
    # broker acknowledged reaches the consumer from that broker.
    prim = Mosquitto(tmp_path / "primary").start()
    sec = Mosquitto(tmp_path / "secondary").start()
    devs = ["sim-%04d" % n for n in range(3)]
    try:
        sim = sim_run("--broker", "%s:%d" % (prim.host, prim.port),
                      "--broker", "%s:%d" % (sec.host, sec.port),
                      "--devices", "3", "--processes", "1", "--interval", "0.5",
                      "--set", "broker.reconnect.first_window=0.5",
                      "--set", "failover.after_s=2", "--set", "failover.probe_s=1",
                      "--set", "failover.failback_window_s=2")

        def births(ls, dev, endpoint, back=False):
            # back: the birth of a return (the restarted primary also hands out its
            # retained status of before it died, which says online on endpoint 0 too).
            head = "devices/%s/status {" % dev
            return [i for i, l in enumerate(ls) if l.startswith(head)
                    and '"state": "online"' in l and '"endpoint": %d' % endpoint in l
                    and (not back or '"failback": true' in l)]

        for dev in devs:
            sim.wait(lambda ls, d=dev: births(ls, d, 0), 60, dev + " online on the primary")
        prim.stop()
        for dev in devs:
            sim.wait(lambda ls, d=dev: births(ls, d, 1) and len(
                _tele(ls[births(ls, d, 1)[0]:], d)) >= 2, 60, dev + " on the secondary")
        moved = [json.loads(l.split(" ", 1)[1]) for l in sim.lines
                 if l.startswith("devices/") and '"endpoint": 1' in l and "/status {" in l
                 and '"online"' in l]
        assert {m["broker"] for m in moved} == {"%s:%d" % (sec.host, sec.port)}, moved
        assert all(m["outage"]["from"] == "%s:%d" % (prim.host, prim.port)
                   and m["outage"]["failover_s"] >= 0 for m in moved), moved
        mark = len(sim.lines)
        prim = Mosquitto(tmp_path / "primary", port=prim.port).start()
        for dev in devs:
            sim.wait(lambda ls, d=dev: births(ls[mark:], d, 0, True) and len(
                _tele(ls[mark + births(ls[mark:], d, 0, True)[0]:], d)) >= 2, 60,
                dev + " back on the primary")
        summary = sim.finish()
    finally:
        prim.stop()
        sec.stop()
    assert summary["gaps"] == 0, summary
    assert summary["online"] == 3 and summary["endpoints"] == [3, 0], summary
    assert summary["consumer_disconnects"] >= 1, "its primary connection went with it"
    assert summary["memory_errors"] == 0 and summary["watchdog_resets"] == 0, summary


def test_a_run_on_the_compiled_build_comes_online(tmp_path):
    """--build: the devices run make mpy's bytecode (the loader's modules included), come
    online and publish; the summary says so and the exit code is 0."""
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--workdir", str(tmp_path),
         "--build", "--duration", "6", "--interval", "0.5", "--quiet"],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["online"] == 1 and summary["telemetry"] >= 3, summary
    assert "never_online" not in summary and "process_exits" not in summary, summary


def test_a_run_whose_devices_never_come_online_fails_loudly(tmp_path):
    """Devices pointed at a port where no broker listens never come online: the run measured
    nothing, and says so with exit code 1 instead of a summary of zeros."""
    from testbed.broker import free_port

    m = Mosquitto(tmp_path / "broker").start()
    try:
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--workdir",
             str(tmp_path / "w"), "--duration", "4", "--quiet",
             "--broker", "127.0.0.1:%d" % free_port(), "--observe", "%s:%d" % (m.host, m.port)],
            capture_output=True, text=True, timeout=120)
    finally:
        m.stop()
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["never_online"] == 1 and summary["online"] == 0, summary
    assert "never came online" in r.stderr
