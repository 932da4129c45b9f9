"""Reconnect-storm simulator: a fleet of the real firmware through a mass disconnect.

    python testbed/storm.py [--devices N]
                          [--scenarios mass-disconnect,overloaded-broker,region-failover,
                                       sim-outage]
                          [--profiles firmware,baseline] [--refuse S] [--fraction F]
                          [--rate R] [--down S] [--after-s S] [--probe-s S]
                          [--failback-window S] [--interval S] [--out FILE] [--plot FILE]

For each scenario and profile: a fresh mosquitto, the fault proxy (testbed/proxy.py) in front
of it, N devices of the firmware on the Unix port packed into a few MicroPython processes
(testbed/devices.start_fleet, as testbed/sim.py does), an observer on the broker itself. Once
every device is connected and its connection has been up longer than the firmware's
`stable_s`, the proxy cuts a `--fraction` of the connections and then either refuses every
new one for `--refuse` s (mass-disconnect) or admits at most `--rate` per second
(overloaded-broker), until every cut device has its session back.

region-failover: two mosquittos, primary and secondary, each behind a fault proxy of its
own, and the devices given both (bootstrap "broker" as a list) with short failover settings
(--after-s, --probe-s, --failback-window). The primary dies: its proxy stops listening, so
even a bare TCP connect (the devices' probe) is refused, and cuts every connection. The
devices move to the secondary; the primary comes back after --down s (and not before every
device is on the secondary), and the devices return to it within the fail-back window.
Measured per broker: the attempts on the secondary while the fleet moves there, those on
the primary while it comes back (probes apart from MQTT CONNECTs), when each device
returned, and the devices still on the secondary after 1.5 probe_s + the window (+ a
margin). An observer on each broker feeds one ledger: a message is lost only if neither
broker delivered it.

sleep-outage (firmware profile only): N battery devices (power.mode duty, a wake every
--wake-every s in real time) through a broker that refuses every connection for --down s:
the connection attempts per second before, during and after (peak over 100 ms bins, mean),
so that a fleet that failed together is seen to wake spread again, and the time until every
device has delivered again.

sim-outage (firmware profile only): testbed/sim.py as an operator runs it, with its defaults
(its own mosquitto, the fault proxy that --outage-every puts in front, start_fleet's packing,
the devices' own health interval): one cut --sim-cut-after s after every device said it is
online, new connections refused for --refuse s. A check, not a figure: it fails (storm.py
exits 1) unless sim.py's summary has every device online at the end, no unexplained loss, no
watchdog reset, no process exit and no MemoryError. The same cut 5 s after the start that
once stalled every process's loop for over a minute on a real disk (an fsync per block
written to the boards' flash images, unixflash.py) and had the runner reset all four as hung.

Profiles: `firmware` is the firmware as shipped. `baseline` is the same firmware in its
bootstrap `"profile": "baseline"`, the pattern of the popular blocking client: a fixed 2 s
retry, clean session, hence a resubscription (config topics included) on every connect.

Measured at the proxy: connection attempts (accepted or refused) per 100 ms, the CONNACK
that gives each cut device its session back, SUBSCRIBE packets and config requests (a
SUBSCRIBE that names a config topic makes the broker send the retained config again: it is
how this firmware asks for config); a SUBSCRIBE after the connection's first PUBLISH is the
per-device random config refresh, not the reconnect, and is counted apart. By the observer: telemetry gaps the devices' drop
counters do not explain, duplicates, the failed attempts each device reports in its birth
message, heap per device from health. Writes the summaries to --out (bench/storm.json),
the attempt series to --series and a plot to --plot, prints a table.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import (ROOT, device_config, error_counts, start_fleet,  # noqa: E402
                           stop_fleet)
from testbed.ledger import Ledger  # noqa: E402
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import FaultProxy  # noqa: E402

SCENARIOS = ("mass-disconnect", "overloaded-broker", "region-failover", "sim-outage",
             "sleep-outage")
PROFILES = ("firmware", "baseline")
BIN_S = 0.1
STABLE_S = 30.0  # the firmware's default broker.reconnect.stable_s
FLAP_S = 10.0  # the firmware's default broker.reconnect.flap_s
# region-failover: a device still on the secondary this long after 1.5 probe_s (the longest
# jittered probe period) + the fail-back window since the primary came back is stuck.
STUCK_MARGIN_S = 15.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated, of %s (default all)" % ", ".join(SCENARIOS))
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help="comma-separated, of %s (default both)" % ", ".join(PROFILES))
    p.add_argument("--refuse", type=float, default=20.0,
                   help="mass-disconnect: refuse new connections for S s after the cut (20)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of the connections the proxy cuts (default 1.0)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="overloaded-broker: new connections admitted per second (default 50)")
    p.add_argument("--down", type=float, default=60.0,
                   help="region-failover: the primary is dead for S s after the cut, and "
                        "until every device is on the secondary (default 60)")
    p.add_argument("--after-s", type=float, default=20.0,
                   help="region-failover: failover.after_s of the devices (default 20)")
    p.add_argument("--after-attempts", type=int,
                   help="region-failover: failover.after_attempts (default the firmware's)")
    p.add_argument("--probe-s", type=float, default=15.0,
                   help="region-failover: failover.probe_s of the devices (default 15)")
    p.add_argument("--failback-window", type=float, default=60.0,
                   help="region-failover: failover.failback_window_s (default 60)")
    p.add_argument("--wake-every", type=float, default=60.0,
                   help="sleep-outage: the battery devices' wake period in s (default 60)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="telemetry period of the devices in s (default 5)")
    p.add_argument("--sim-cut-after", type=float, default=5.0,
                   help="sim-outage: the cut S s after every device is online (default 5)")
    p.add_argument("--health-interval", type=float, default=30.0,
                   help="health period of the devices in s (memory per device; default 30)")
    p.add_argument("--first-window", type=float,
                   help="broker.reconnect.first_window of the firmware profile (default 5)")
    p.add_argument("--stable-s", type=float,
                   help="broker.reconnect.stable_s of the devices (default the firmware's, 30 s)")
    p.add_argument("--timeout", type=float, default=240.0,
                   help="give up waiting for the fleet to come back after S s (default 240)")
    p.add_argument("--processes", type=int, help="MicroPython processes (default: by fleet size)")
    p.add_argument("--seed", type=int, default=1, help="seed of the cut's random choice")
    p.add_argument("--workdir", help="flash images and broker files (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "storm.json"),
                   help="summaries, merged into this JSON file (default bench/storm.json)")
    p.add_argument("--series", default=os.path.join(ROOT, "bench", "storm-series.json"),
                   help="attempts per 100 ms, for the plot (default bench/storm-series.json)")
    p.add_argument("--before", default=os.path.join(ROOT, "bench", "storm-series-before.json"),
                   help="an earlier run's series whose firmware curve the plot shows too "
                        "(default bench/storm-series-before.json; '' for none)")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "storm.png"),
                   help="PNG of attempts over time (default bench/storm.png; '' for none)")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    a = p.parse_args(argv)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.profiles = [s for s in a.profiles.split(",") if s]
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error("unknown scenario %r (known: %s)" % (s, ", ".join(SCENARIOS)))
    for s in a.profiles:
        if s not in PROFILES:
            p.error("unknown profile %r (known: %s)" % (s, ", ".join(PROFILES)))
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if not 0 < a.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if a.refuse < 0 or a.rate <= 0 or a.interval <= 0:
        p.error("--refuse must not be negative, --rate and --interval must be positive")
    if a.down < 0 or a.after_s < 1 or a.probe_s < 1 or a.failback_window < 0:
        p.error("--down and --failback-window must not be negative, --after-s and "
                "--probe-s must be at least 1")
    return a


def busiest(times, width=BIN_S):
    """Most times within any window of `width` s: fixed bins would split a synchronised
    wave that lands on a bin edge and understate it."""
    ts = sorted(times)
    most = j = 0
    for i, t in enumerate(ts):
        while ts[j] <= t - width:
            j += 1
        most = max(most, i - j + 1)
    return most


def bins(times, t0, t1):
    """Counts per BIN_S bin of the times in [t0, t1), bins aligned to t0."""
    n = max(1, int((t1 - t0) / BIN_S + 0.999))
    out = [0] * n
    for t in times:
        if t0 <= t < t1:
            out[min(n - 1, int((t - t0) / BIN_S))] += 1
    return out


class Scenario:
    """What every scenario run has: its name, profile, arguments and a directory of its own."""

    def __init__(self, scenario, profile, a, workdir, say):
        self.scenario = scenario
        self.profile = profile
        self.a = a
        self.dir = os.path.join(workdir, "%s-%s" % (scenario, profile))
        os.makedirs(self.dir, exist_ok=True)
        self.say = say


class Run(Scenario):
    """One scenario with one profile: its own broker, proxy, fleet and observer."""

    def __init__(self, *args):
        Scenario.__init__(self, *args)
        self.ledger = Ledger()
        self.lock = threading.Lock()
        self.births = {}  # device -> [(t, status doc, broker index)] of online births
        self.heap = {}  # device -> largest heap_alloc reported in health
        self.mqtt = {}  # device -> {"failovers": n, "failbacks": n}, the largest in health

    def _on_msg(self, t, topic, payload, retain, broker=0):
        parts = topic.split("/")
        if len(parts) != 3:
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        dev, kind = parts[1], parts[2]
        with self.lock:
            if kind == "telemetry" and isinstance(msg.get("seq"), int):
                self.ledger.telemetry(dev, msg, t)
            elif kind == "status" and msg.get("state") == "online" and not retain:
                self.births.setdefault(dev, []).append((t, msg, broker))
            elif kind == "health":
                if isinstance(msg.get("heap_alloc"), int):
                    self.heap[dev] = max(self.heap.get(dev, 0), msg["heap_alloc"])
                m = msg.get("mqtt")
                if isinstance(m, dict):
                    seen = self.mqtt.setdefault(dev, {})
                    for k in ("failovers", "failbacks"):
                        if isinstance(m.get(k), int):
                            seen[k] = max(seen.get(k, 0), m[k])

    def configs(self, host, port, endpoints=(), **extra):
        a = self.a
        rec = {}
        if a.stable_s is not None:
            rec["stable_s"] = a.stable_s
        if a.first_window is not None and self.profile == "firmware":
            rec["first_window"] = a.first_window
        if self.profile == "baseline":
            extra["profile"] = "baseline"
        return [device_config("storm-%04d" % i, host, port, endpoints=endpoints,
                              telemetry_interval=a.interval, health_interval=a.health_interval,
                              broker={"reconnect": dict(rec)} if rec else None, **extra)
                for i in range(a.devices)]

    def connected_since(self, proxy, mark, latest=False):
        """client id -> time of its first (or latest) accepted CONNACK after mark."""
        back = {}
        for p in proxy.packets_since(mark, "CONNACK"):
            if p.rc == 0:
                cid = proxy.clients.get(p.conn)
                if cid is not None and (latest or cid not in back):
                    back[cid] = p.t
        return back

    def wait_back(self, proxy, mark, who, timeout, fleet=None):
        """Poll until every client id in `who` has a CONNACK after mark; returns the map.
        Raises if every process of `fleet` has died (a firmware that does not start)."""
        end = time.monotonic() + timeout
        want = set(who)
        while True:
            back = self.connected_since(proxy, mark)
            if want <= set(back):
                return back
            if time.monotonic() > end:
                return back
            if fleet and all(p.down() for p in fleet):
                raise RuntimeError("%s/%s: every device process exited; see %s/devices-0.log:"
                                   "\n%s" % (self.scenario, self.profile, self.dir,
                                             fleet[0].output()[-2000:]))
            time.sleep(0.2)

    def start_stable(self, proxy, configs, fleet, what):
        """Start the devices (into `fleet`, so the caller stops them whatever happens), wait
        until each is connected through `proxy`, then until the newest connection has been
        up longer than stable_s."""
        a = self.a
        start = proxy.mark()
        fleet.extend(start_fleet(configs, self.dir, processes=a.processes))
        ids = ["storm-%04d" % i for i in range(a.devices)]
        up = self.wait_back(proxy, start, ids, a.timeout, fleet)
        if len(up) < a.devices:
            raise RuntimeError("%s/%s: only %d of %d devices connected at the start"
                               % (self.scenario, self.profile, len(up), a.devices))
        # A connection older than stable_s (and than flap_s, so the cut is no flap) is
        # what a fleet that has been up a while has; the cut then finds every device
        # on its normal reconnect path.
        stable = max(FLAP_S, STABLE_S if a.stable_s is None else a.stable_s)
        # Latest CONNACKs: a board that reconnected since (a watchdog reset) counts anew.
        up = self.connected_since(proxy, start, latest=True)
        wait = max(up.values()) + stable + 2.0 - time.monotonic()
        self.say("%s/%s: %d devices connected; %s in %.0f s"
                 % (self.scenario, self.profile, a.devices, what, max(0.0, wait)))
        time.sleep(max(0.0, wait))

    def run(self):
        broker = Mosquitto(os.path.join(self.dir, "broker")).start()
        proxy = FaultProxy(broker.host, broker.port, record="control").start()
        obs = Observer(broker.host, broker.port,
                       topics=("devices/+/telemetry", "devices/+/status", "devices/+/health"),
                       on_message=self._on_msg)
        fleet = []
        try:
            self.start_stable(proxy, self.configs(proxy.host, proxy.port), fleet, "cut")
            summary, series = self._storm(proxy)
            summary["watchdog_resets"] = sum(len(p.resets) for p in fleet)
        finally:
            marks = self.wind_up(fleet, [obs], [proxy, broker])
        self.tally(summary, fleet, marks)
        return summary, series

    def wind_up(self, fleet, observers, services):
        """Stop the devices gracefully (their output up to here is the run's, what follows
        the stop's), let the last acknowledged messages reach the observers, close those,
        stop the proxies and brokers, keep the device logs. Returns the stop marks."""
        marks = stop_fleet(fleet, timeout=20)
        time.sleep(1.0)
        for o in observers:
            o.close()
        for s in services:
            s.stop()
        for i, p in enumerate(fleet):
            with open(os.path.join(self.dir, "devices-%d.log" % i), "w") as f:
                f.write(p.output() + "\n")
        return marks

    def tally(self, summary, fleet, marks):
        """The ledger's and the devices' figures of the run, into summary."""
        with self.lock:
            summary["telemetry"] = self.ledger.received
            summary["unexplained_loss"] = self.ledger.gaps()
            summary["duplicates"] = self.ledger.duplicates
            heap = dict(self.heap)
        summary.update(error_counts(fleet, marks))
        summary["heap_per_device_bytes"] = per_device_heap(heap, fleet)

    def _storm(self, proxy):
        a = self.a
        mark = proxy.mark()
        t_cut = time.monotonic()
        if self.scenario == "mass-disconnect":
            proxy.refuse(True)
            n = proxy.cut(a.fraction, random.Random(a.seed))
            time.sleep(a.refuse)
            proxy.refuse(False)
            t_open = time.monotonic()
        else:
            proxy.rate_limit(a.rate)
            n = proxy.cut(a.fraction, random.Random(a.seed))
            t_open = t_cut
        cut = [c for c in proxy.last_cut if c]
        self.say("%s/%s: cut %d connections" % (self.scenario, self.profile, n))
        back = self.wait_back(proxy, mark, cut, a.timeout)
        times = [back[c] for c in cut if c in back]
        t_back = max(times) if times else time.monotonic()
        all_back = all(c in back for c in cut)
        # Subscriptions and config follow a CONNACK at once; wait for the last ones.
        time.sleep(3.0)
        proxy.rate_limit(None)
        t_end = t_back + 3.0
        attempts = [t for t, _ in proxy.attempts_since(mark) if t_cut <= t <= t_back]
        # A SUBSCRIBE before the connection's first PUBLISH is part of setting the session
        # up again: the reconnect's cost. One later is the per-device random config refresh,
        # which runs at the same rate with or without an outage (1000 devices, 6 h period:
        # one every ~22 s); counted apart.
        never = float("inf")
        subs, scheduled = [], []
        for p in proxy.packets_since(mark, "SUBSCRIBE", "up"):
            if p.t <= t_end:
                (subs if p.t < proxy.first_publish.get(p.conn, never) else scheduled).append(p)

        def config_of(ps):
            return [p for p in ps if any("/config/" in f for f in (p.filters or ()))]
        span = max(t_back - t_cut, BIN_S)
        peak = busiest(attempts) / BIN_S
        mean = len(attempts) / span
        with self.lock:
            failed = []
            for c in cut:
                later = [m for t, m, _ in self.births.get(c, ()) if t >= t_cut]
                out = (later[0].get("outage") or {}) if later else {}
                failed.append(out.get("failed", 0) if later else None)
        reported = [f for f in failed if f is not None]
        summary = {
            "devices": a.devices,
            "cut": n,
            "refuse_s": a.refuse if self.scenario == "mass-disconnect" else 0,
            "rate_limit_per_s": a.rate if self.scenario == "overloaded-broker" else None,
            "peak_attempts_per_s": round(peak, 1),
            "mean_attempts_per_s": round(mean, 1),
            "peak_to_mean": round(peak / mean, 2) if mean else None,
            "recovery_s": round(t_back - t_open, 2) if all_back else None,
            "all_back": all_back,
            "back": len([c for c in cut if c in back]),
            "total_attempts": len(attempts),
            "attempts_per_device": round(len(attempts) / max(1, n), 2),
            # Failed attempts each device counted itself (its birth message's outage).
            "failed_attempts_per_device_max": max(reported) if reported else None,
            "failed_attempts_per_device_mean": (round(sum(reported) / len(reported), 2)
                                                if reported else None),
            "subscribes_during_recovery": len(subs),
            "config_requests_during_recovery": len(config_of(subs)),
            "scheduled_refreshes_during_recovery": len(config_of(scheduled)),
        }
        lead = 2.0  # the plot starts a little before the cut
        series = {"t0": -lead, "bin_s": BIN_S, "reopen_s": round(t_open - t_cut, 2),
                  "attempts": bins([t for t, _ in proxy.attempts_since(mark)] , t_cut - lead,
                                   t_back + 2.0)}
        self.say("%s/%s: %s" % (self.scenario, self.profile, json.dumps(summary)))
        return summary, series


class SimOutageRun(Scenario):
    """sim-outage: testbed/sim.py in a process of its own, as an operator runs it (module
    docstring); the summary is sim.py's JSON line, with `failures` saying what it lacks."""

    # sim.py's wait for the fleet (UP_WAIT_S) and, after the refusal, the time the fleet gets
    # to come back, telemetry flowing again (its `online` asks for some in the last 10 s).
    UP_S = 60.0
    BACK_S = 80.0

    def argv(self):
        a = self.a
        duration = self.UP_S + a.sim_cut_after + a.refuse + self.BACK_S
        args = [sys.executable, os.path.join(ROOT, "testbed", "sim.py"),
                "--devices", str(a.devices), "--interval", "%g" % a.interval,
                "--outage-every", "%g" % a.sim_cut_after, "--outage-for", "%g" % a.refuse,
                "--outages", "1", "--duration", "%g" % duration, "--quiet",
                "--workdir", os.path.join(self.dir, "sim")]
        if a.processes:
            args += ["--processes", str(a.processes)]
        return args

    def run(self):
        a = self.a
        argv = self.argv()
        self.say("%s: %s" % (self.scenario, " ".join(argv[1:])))
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                           timeout=float(argv[argv.index("--duration") + 1]) + 180)
        with open(os.path.join(self.dir, "sim.out"), "w") as f:
            f.write(r.stdout + r.stderr)
        docs = [line for line in r.stdout.splitlines() if line.startswith("{")]
        summary = json.loads(docs[-1]) if docs else {"devices": a.devices}
        summary["sim_rc"] = r.returncode
        summary["unexplained_loss"] = summary.get("gaps")
        summary["failures"] = sim_outage_failures(summary, a.devices)
        self.say("%s: %s" % (self.scenario, json.dumps(summary)))
        return summary, None


class SleepOutageRun(Run):
    """sleep-outage: N battery devices (power.mode duty, a wake every --wake-every s, real
    time) through a broker that refuses every connection for --down s. Measured at the
    proxy: connection attempts per second in a wake period before the outage, during it
    and in 1.5 periods after it (the peak over 100 ms bins, as the other scenarios, and the
    mean), the time until every device has delivered again, and loss by the ledger."""

    def __init__(self, *args):
        Run.__init__(self, *args)
        self.slept = {}  # device -> times of its "sleeping" statuses

    def _on_msg(self, t, topic, payload, retain, broker=0):
        Run._on_msg(self, t, topic, payload, retain, broker)
        if topic.endswith("/status") and b'"sleeping"' in payload and not retain:
            with self.lock:
                self.slept.setdefault(topic.split("/")[1], []).append(t)

    def _all_slept_since(self, t0, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                n = sum(1 for ts in self.slept.values() if ts[-1] >= t0)
            if n >= self.a.devices:
                return True
            time.sleep(0.5)
        return False

    def run(self):
        a = self.a
        T = a.wake_every
        broker = Mosquitto(os.path.join(self.dir, "broker")).start()
        proxy = FaultProxy(broker.host, broker.port, record="control").start()
        obs = Observer(broker.host, broker.port,
                       topics=("devices/+/telemetry", "devices/+/status"),
                       on_message=self._on_msg)
        fleet = []
        try:
            configs = self.configs(
                proxy.host, proxy.port,
                power={"mode": "duty", "wake_every_s": T, "awake_max_s": 10},
                refresh_interval=604800)
            for c in configs:
                c["health_interval"] = 86400  # one health report a day: not the figure here
            t0 = time.monotonic()
            fleet.extend(start_fleet(configs, self.dir, processes=a.processes))
            if not self._all_slept_since(t0, a.timeout):
                raise RuntimeError("sleep-outage: not every device delivered at the start")
            # The first sleep of a boot is anywhere in [T/2, 3T/2]: after 1.5 T the fleet
            # wakes as it will from then on.
            self.say("sleep-outage: %d devices delivered once; spreading for %.0f s"
                     % (a.devices, 1.5 * T))
            time.sleep(1.5 * T)
            m0 = proxy.mark()
            time.sleep(T)
            before = [t for t, _ in proxy.attempts_since(m0)]
            proxy.refuse(True)
            m1 = proxy.mark()
            self.say("sleep-outage: refusing for %.0f s" % a.down)
            time.sleep(a.down)
            proxy.refuse(False)
            m2 = proxy.mark()
            t_open = time.monotonic()
            during = [t for t, _ in proxy.attempts_since(m1) if t < t_open]
            back = self._all_slept_since(t_open, 3 * T + a.timeout)
            t_back = time.monotonic()
            time.sleep(max(0.0, t_open + 1.5 * T - time.monotonic()))
            after = [t for t, _ in proxy.attempts_since(m2) if t < t_open + 1.5 * T]

            def rates(ts, span):
                return {"peak": round(busiest(ts) / BIN_S, 1) if ts else 0,
                        "mean": round(len(ts) / span, 1)}
            summary = {
                "devices": a.devices, "wake_every_s": T, "down_s": a.down,
                "attempts_per_s_before": rates(before, T),
                "attempts_per_s_during": rates(during, a.down),
                "attempts_per_s_after": rates(after, 1.5 * T),
                "peak_attempts_per_s": rates(after, 1.5 * T)["peak"],
                "all_back": back,
                "recovery_s": round(t_back - t_open, 1) if back else None,
            }
            summary["watchdog_resets"] = sum(len(p.resets) for p in fleet)
        finally:
            marks = self.wind_up(fleet, [obs], [proxy, broker])
        self.tally(summary, fleet, marks)
        self.say("sleep-outage: %s" % json.dumps(summary))
        return summary, None


def sim_outage_failures(summary, devices):
    """What a sim-outage run's summary lacks (empty: it passed)."""
    out = []
    if summary.get("sim_rc") != 0 or "online" not in summary:
        out.append("sim.py exited with %s" % summary.get("sim_rc"))
    if summary.get("outages") != 1 or summary.get("outage_cuts", 0) < devices:
        out.append("the cut did not take every device (outages %s, cut %s)"
                   % (summary.get("outages"), summary.get("outage_cuts")))
    if summary.get("online") != devices:
        out.append("%s of %d devices online at the end" % (summary.get("online"), devices))
    for k in ("gaps", "watchdog_resets", "memory_errors", "process_exits", "never_online"):
        if summary.get(k):
            out.append("%s: %s" % (k, summary[k]))
    return out


def quantile(xs, q):
    """The q-quantile (nearest rank) of xs, None if empty."""
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))]


def _s(x):
    return None if x is None else round(x, 2)


class FailoverRun(Run):
    """region-failover: a primary and a secondary broker, each behind its own proxy and
    read by its own observer; the primary dies, comes back after --down s."""

    def wait_settled(self, prim, mark, who, deadline, hold=2.0):
        """Poll until every client id in `who` has had a CONNACK from `prim` after mark and
        is connected to it, over the same connections `hold` s apart; True if so by the
        deadline (monotonic s)."""
        want = set(who)
        seen = None
        while time.monotonic() < deadline:
            now = prim.connected_clients()
            if want <= set(self.connected_since(prim, mark)) and want <= set(now):
                ours = {c: now[c] for c in want}
                if seen is not None and seen[0] == ours and time.monotonic() >= seen[1] + hold:
                    return True
                if seen is None or seen[0] != ours:
                    seen = (ours, time.monotonic())
            else:
                seen = None
            time.sleep(0.2)
        return False

    def run(self):
        a = self.a
        brokers = [Mosquitto(os.path.join(self.dir, name)).start()
                   for name in ("primary", "secondary")]
        proxies, observers, fleet = [], [], []
        try:
            for b in brokers:
                proxies.append(FaultProxy(b.host, b.port, record="control").start())
            for i, b in enumerate(brokers):
                # The consumer reads both: a message is lost only if neither delivered it.
                observers.append(Observer(
                    b.host, b.port,
                    topics=("devices/+/telemetry", "devices/+/status", "devices/+/health"),
                    on_message=lambda *m, i=i: self._on_msg(*m, broker=i)))
            prim, sec = proxies
            fo = {"after_s": a.after_s, "probe_s": a.probe_s,
                  "failback_window_s": a.failback_window}
            if a.after_attempts is not None:
                fo["after_attempts"] = a.after_attempts
            self.start_stable(prim, self.configs(prim.host, prim.port, [(sec.host, sec.port)],
                                                 failover=fo), fleet, "the primary dies")
            summary, series = self._failover(prim, sec)
            summary["watchdog_resets"] = sum(len(p.resets) for p in fleet)
        finally:
            marks = self.wind_up(fleet, observers, proxies + brokers)
        self.tally(summary, fleet, marks)
        with self.lock:
            counts = list(self.mqtt.values())
        for k in ("failovers", "failbacks"):
            # From health (every health_interval s): the largest count each device reported.
            summary["%s_reported" % k] = sum(c.get(k, 0) for c in counts)
        return summary, series

    def _failover(self, prim, sec):
        a = self.a
        tag = "%s/%s" % (self.scenario, self.profile)
        mark_p, mark_s = prim.mark(), sec.mark()
        t_cut = time.monotonic()
        prim.listen(False)  # the host refuses even a bare TCP connect (the devices' probe)
        n = prim.cut()
        cut = [c for c in prim.last_cut if c]
        self.say("%s: the primary died, %d connections cut" % (tag, n))
        # Failover: every cut device connected to the secondary.
        on_sec = self.wait_back(sec, mark_s, cut, a.timeout)
        over = [on_sec[c] for c in cut if c in on_sec]
        all_over = len(over) == len(cut)
        t_over = max(over) if over else time.monotonic()
        self.say("%s: %d of %d on the secondary after %.1f s"
                 % (tag, len(over), len(cut), t_over - t_cut))
        # Subscriptions and the queued resends follow a CONNACK at once.
        time.sleep(max(3.0, t_cut + a.down - time.monotonic()))
        mark_up = prim.mark()
        prim.listen(True)
        t_up = time.monotonic()
        self.say("%s: the primary is back after %.1f s" % (tag, t_up - t_cut))
        deadline = t_up + 1.5 * a.probe_s + a.failback_window + STUCK_MARGIN_S
        settled = self.wait_settled(prim, mark_up, cut, deadline)
        t_check = time.monotonic()
        back = self.connected_since(prim, mark_up)
        returns = [back[c] for c in cut if c in back]
        all_back = len(returns) == len(cut)
        t_back = max(returns) if returns else t_check
        # Where each device is at the end: connected to which broker, if any.
        now_p, now_s = prim.connected_clients(), sec.connected_clients()
        stuck = sorted(c for c in cut if c in now_s)
        away = sorted(c for c in cut if c not in now_p)
        # Connections to the primary after its return beyond one per device: returns that
        # did not hold.
        reconnects = len([p for p in prim.packets_since(mark_up, "CONNACK") if p.rc == 0]) \
            - len(returns)
        self.say("%s: %d of %d back on the primary within %.1f s, %s; %d on the secondary, "
                 "%d not on the primary, %d reconnects to it"
                 % (tag, len(returns), len(cut), t_back - t_up,
                    "settled" if settled else "NOT settled", len(stuck), len(away), reconnects))

        never = float("inf")

        def setup_subs(proxy, mark, t_end):
            """SUBSCRIBEs before the connection's first PUBLISH (setting the session up)
            and later ones (the random config refresh), up to t_end."""
            subs, scheduled = [], []
            for p in proxy.packets_since(mark, "SUBSCRIBE", "up"):
                if p.t <= t_end:
                    (subs if p.t < proxy.first_publish.get(p.conn, never)
                     else scheduled).append(p)
            return subs, scheduled

        def config_of(ps):
            return [p for p in ps if any("/config/" in f for f in (p.filters or ()))]

        # Failover: the secondary's load while the fleet moves there.
        att_s = [t for t, _ in sec.attempts_since(mark_s) if t_cut <= t <= t_over]
        subs_s, sched_s = setup_subs(sec, mark_s, t_over + 3.0)
        span = max(t_over - t_cut, BIN_S)
        peak = busiest(att_s) / BIN_S
        mean = len(att_s) / span
        # Fail-back: the primary's load while the fleet returns. A probe is a TCP connection
        # without a CONNECT; an MQTT attempt sends one.
        att_p = [t for t, _ in prim.attempts_since(mark_up) if t <= t_back]
        con_p = [p.t for p in prim.packets_since(mark_up, "CONNECT", "up") if p.t <= t_back]
        subs_p, _ = setup_subs(prim, mark_up, t_back + 3.0)
        since_up = sorted(t - t_up for t in returns)
        with self.lock:
            failed, fo_s, named, returned = [], [], 0, 0
            for c in cut:
                # The birth on the primary after its return says it is one.
                if any(i == 0 and t >= t_up and m.get("endpoint") == 0
                       and (m.get("outage") or {}).get("failback")
                       for t, m, i in self.births.get(c, ())):
                    returned += 1
                later = [(m, i) for t, m, i in self.births.get(c, ()) if t >= t_cut]
                if not later:
                    failed.append(None)
                    continue
                m, i = later[0]
                out = m.get("outage") or {}
                failed.append(out.get("failed", 0))
                if isinstance(out.get("failover_s"), (int, float)):
                    fo_s.append(out["failover_s"])
                # The birth on the secondary names it, and the primary as where it came from.
                if (i == 1 and m.get("endpoint") == 1
                        and m.get("broker") == "%s:%d" % (sec.host, sec.port)
                        and out.get("from") == "%s:%d" % (prim.host, prim.port)):
                    named += 1
        reported = [f for f in failed if f is not None]
        failover_at = sorted(on_sec[c] - t_cut for c in cut if c in on_sec)
        summary = {
            "devices": a.devices,
            "cut": n,
            "refuse_s": 0,
            "rate_limit_per_s": None,
            "down_s": round(t_up - t_cut, 2),
            "after_s": a.after_s,
            "probe_s": a.probe_s,
            "failback_window_s": a.failback_window,
            # The failover, on the secondary: the figures the other scenarios have.
            "peak_attempts_per_s": round(peak, 1),
            "mean_attempts_per_s": round(mean, 1),
            "peak_to_mean": round(peak / mean, 2) if mean else None,
            "recovery_s": round(t_over - t_cut, 2) if all_over else None,
            "all_back": all_over,
            "back": len(over),
            "total_attempts": len(att_s),
            "attempts_per_device": round(len(att_s) / max(1, n), 2),
            "failed_attempts_per_device_max": max(reported) if reported else None,
            "failed_attempts_per_device_mean": (round(sum(reported) / len(reported), 2)
                                                if reported else None),
            "subscribes_during_recovery": len(subs_s),
            "config_requests_during_recovery": len(config_of(subs_s)),
            "scheduled_refreshes_during_recovery": len(config_of(sched_s)),
            # Seconds from the cut to each device's first CONNACK on the secondary.
            "failover_s_min": _s(failover_at[0] if failover_at else None),
            "failover_s_median": _s(quantile(failover_at, 0.5)),
            "failover_s_max": _s(failover_at[-1] if failover_at else None),
            # The same as the devices tell it (birth outage.failover_s).
            "birth_failover_s_max": _s(max(fo_s) if fo_s else None),
            "births_naming_the_move": named,
            "births_naming_the_return": returned,
            # The fail-back, on the primary.
            "failback_peak_attempts_per_s": round(busiest(att_p) / BIN_S, 1),
            "failback_peak_connects_per_s": round(busiest(con_p) / BIN_S, 1),
            "failback_attempts": len(att_p),
            "failback_connects": len(con_p),
            "failback_probes": max(0, len(att_p) - len(con_p)),
            # Seconds from the primary's return to each device's first CONNACK there.
            "failback_first_s": _s(since_up[0] if since_up else None),
            "failback_median_s": _s(quantile(since_up, 0.5)),
            "failback_last_s": _s(since_up[-1] if since_up else None),
            # The most devices returning within any one second (uniform over the window:
            # about N / failback_window_s).
            "failback_busiest_second": busiest(returns, 1.0),
            "failback_subscribes": len(subs_p),
            "failback_config_requests": len(config_of(subs_p)),
            "all_failed_back": all_back,
            "failed_back": len(returns),
            # CONNACKs from the primary after its return beyond one per device (a return
            # whose connection did not hold, and its retry).
            "failback_reconnects": reconnects,
            # At the end (every device back and staying, or 1.5 probe_s + the window + a
            # margin after the return): devices connected to the secondary, and devices
            # not connected to the primary (stuck, or between attempts).
            "stuck_on_secondary": len(stuck),
            "not_on_primary": len(away),
        }
        lead = 2.0
        t1 = max(t_back, t_check) + 2.0
        series = {"t0": -lead, "bin_s": BIN_S, "reopen_s": round(t_up - t_cut, 2),
                  "attempts": bins([t for t, _ in sec.attempts_since(mark_s)],
                                   t_cut - lead, t1),
                  "attempts_primary": bins([t for t, _ in prim.attempts_since(mark_p)],
                                           t_cut - lead, t1)}
        self.say("%s: %s" % (tag, json.dumps(summary)))
        if stuck:
            self.say("%s: still on the secondary: %s" % (tag, " ".join(stuck[:20])))
        return summary, series


def per_device_heap(heap, fleet):
    """Largest heap_alloc of each process (its devices share one heap) over its devices."""
    worst = 0
    for p in fleet:
        ids = [os.path.basename(s.image)[:-4] for s in p.specs]
        alloc = max((heap.get(i, 0) for i in ids), default=0)
        worst = max(worst, alloc // max(1, len(ids)))
    return worst or None


def ratios(results):
    """baseline / firmware for the figures where smaller is better."""
    out = {}
    for scenario, by in results.items():
        f, b = by.get("firmware"), by.get("baseline")
        if not f or not b:
            continue
        r = {}
        for k in ("peak_attempts_per_s", "total_attempts", "subscribes_during_recovery",
                  "config_requests_during_recovery", "failback_peak_attempts_per_s",
                  "failback_peak_connects_per_s", "failback_busiest_second"):
            if k not in f:
                continue
            if f.get(k) and b.get(k) is not None:
                r[k] = round(b[k] / f[k], 1)
            elif b.get(k):
                r[k] = "inf"
        out[scenario] = r
    return out


FAILOVER_KEYS = ("failover_s_median", "failover_s_max", "birth_failover_s_max",
                 "failback_peak_attempts_per_s", "failback_peak_connects_per_s",
                 "failback_probes", "failback_first_s", "failback_median_s", "failback_last_s",
                 "failback_busiest_second", "failback_subscribes", "failback_config_requests",
                 "failed_back", "failback_reconnects", "stuck_on_secondary",
                 "not_on_primary")
SIM_KEYS = ("online", "telemetry", "outage_cuts", "reconnects", "refused", "watchdog_resets",
            "process_exits", "failures")
SLEEP_KEYS = ("wake_every_s", "down_s", "attempts_per_s_before", "attempts_per_s_during",
              "attempts_per_s_after", "all_back", "watchdog_resets")


def table(results):
    keys = ("devices", "peak_attempts_per_s", "mean_attempts_per_s", "peak_to_mean",
            "recovery_s", "total_attempts", "failed_attempts_per_device_max",
            "subscribes_during_recovery", "config_requests_during_recovery",
            "scheduled_refreshes_during_recovery", "unexplained_loss", "duplicates",
            "heap_per_device_bytes", "memory_errors", "stop_errors")
    lines = []
    for scenario, by in results.items():
        lines.append("\n%s\n| figure | firmware | baseline |\n|---|---|---|" % scenario)
        more = {"region-failover": FAILOVER_KEYS, "sim-outage": SIM_KEYS,
                "sleep-outage": SLEEP_KEYS}.get(scenario, ())
        for k in keys + more:
            lines.append("| %s | %s | %s |" % (k, by.get("firmware", {}).get(k, "-"),
                                              by.get("baseline", {}).get(k, "-")))
    return "\n".join(lines)


def plot(series, path, before=None):
    """before: an earlier run's series (bench/storm-series-before.json): its firmware curve is
    drawn too, to compare a change of the reconnect policy on the same panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (scenario, series key, title, x label) of each panel
    panels = []
    for s in SCENARIOS:
        if s not in series:
            continue
        if s == "region-failover":
            panels += [(s, "attempts", "region-failover: the secondary",
                        "seconds since the primary died (dashed: it is back)"),
                       (s, "attempts_primary", "region-failover: the primary (probes "
                        "included; refused by the host, uncounted, while dead)",
                        "seconds since the primary died (dashed: it is back)")]
        else:
            panels.append((s, "attempts", s,
                           "seconds since the cut (dashed: the proxy accepts again)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)),
                             squeeze=False)
    for ax, (s, key, title, xlabel) in zip(axes[:, 0], panels):
        curves = [("baseline", "tab:red", series[s].get("baseline"),
                   "fixed 2 s, clean session"),
                  ("firmware", "tab:blue", series[s].get("firmware"),
                   "jittered, kept session, ceiling bound by the time offline")]
        if before and s in before and before[s].get("firmware"):
            curves.insert(1, ("firmware before", "tab:green", before[s]["firmware"],
                              "issue 28: ceiling by attempt count only"))
        for profile, style, d, what in curves:
            if not d or key not in d:
                continue
            xs = [d["t0"] + i * d["bin_s"] for i in range(len(d[key]))]
            ys = [c / d["bin_s"] for c in d[key]]
            ax.step(xs, ys, where="post", color=style, lw=1,
                    label="%s (%s)" % (profile, what))
            if d["reopen_s"]:
                ax.axvline(d["reopen_s"], color="grey", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("connection attempts / s\n(per 100 ms bin)")
        ax.set_yscale("symlog", linthresh=100)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_json(path, update):
    data = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError:
            data = {}
    for scenario, by in update.items():
        data.setdefault(scenario, {}).update(by)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return data


def storm(argv=None):
    """Run the storms; returns {scenario: {profile: summary}}."""
    a = parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="storm-")
    say = (lambda s: None) if a.quiet else (lambda s: print("storm: " + s, flush=True))
    results, series = {}, {}
    for scenario in a.scenarios:
        for profile in a.profiles:
            if scenario == "sim-outage" and profile != "firmware":
                continue  # a check of the simulator at fleet scale, not a comparison
            if scenario == "sleep-outage" and profile != "firmware":
                continue  # the baseline client has no duty cycle
            kind = {"region-failover": FailoverRun, "sim-outage": SimOutageRun,
                    "sleep-outage": SleepOutageRun}.get(scenario, Run)
            summary, s = kind(scenario, profile, a, workdir, say).run()
            results.setdefault(scenario, {})[profile] = summary
            # Written after each run: a later one that fails keeps what was measured.
            if a.out:
                merge_json(a.out, {scenario: {profile: summary}})
            if s is None:
                continue  # no attempt series (sim-outage, sleep-outage)
            series.setdefault(scenario, {})[profile] = s
            if a.series:
                merge_json(a.series, {scenario: {profile: s}})
    if a.series:
        if a.plot:
            before = None
            if a.before and os.path.exists(a.before):
                with open(a.before) as f:
                    before = json.load(f)
            with open(a.series) as f:
                plot(json.load(f), a.plot, before)
    return results


def main(argv=None):
    results = storm(argv)
    print(table(results))
    print("\nbaseline / firmware: %s" % json.dumps(ratios(results)))
    failed = [(sc, p, r["failures"]) for sc, by in results.items() for p, r in by.items()
              if r.get("failures")]
    for sc, p, why in failed:
        print("FAILED %s/%s: %s" % (sc, p, "; ".join(why)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
