"""Reconnect-storm simulator: a fleet of the real firmware through a mass disconnect.

    python tools/storm.py [--devices N] [--scenarios mass-disconnect,overloaded-broker]
                          [--profiles firmware,baseline] [--refuse S] [--fraction F]
                          [--rate R] [--interval S] [--out FILE] [--plot FILE]

For each scenario and profile: a fresh mosquitto, the fault proxy (tools/proxy.py) in front
of it, N devices of the firmware on the Unix port packed into a few MicroPython processes
(tools/devices.start_fleet, as tools/sim.py does), an observer on the broker itself. Once
every device is connected and its connection has been up longer than the firmware's
`stable_s`, the proxy cuts a `--fraction` of the connections and then either refuses every
new one for `--refuse` s (mass-disconnect) or admits at most `--rate` per second
(overloaded-broker), until every cut device has its session back.

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
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.broker import Mosquitto  # noqa: E402
from tools.devices import (ROOT, device_config, error_counts, start_fleet,  # noqa: E402
                           stop_fleet)
from tools.ledger import Ledger  # noqa: E402
from tools.observer import Observer  # noqa: E402
from tools.proxy import FaultProxy  # noqa: E402

SCENARIOS = ("mass-disconnect", "overloaded-broker")
PROFILES = ("firmware", "baseline")
BIN_S = 0.1
STABLE_S = 30.0  # the firmware's default broker.reconnect.stable_s
FLAP_S = 10.0  # the firmware's default broker.reconnect.flap_s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated, of %s (default both)" % ", ".join(SCENARIOS))
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help="comma-separated, of %s (default both)" % ", ".join(PROFILES))
    p.add_argument("--refuse", type=float, default=20.0,
                   help="mass-disconnect: refuse new connections for S s after the cut (20)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of the connections the proxy cuts (default 1.0)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="overloaded-broker: new connections admitted per second (default 50)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="telemetry period of the devices in s (default 5)")
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


class Run:
    """One scenario with one profile: its own broker, proxy, fleet and observer."""

    def __init__(self, scenario, profile, a, workdir, say):
        self.scenario = scenario
        self.profile = profile
        self.a = a
        self.dir = os.path.join(workdir, "%s-%s" % (scenario, profile))
        os.makedirs(self.dir, exist_ok=True)
        self.say = say
        self.ledger = Ledger()
        self.lock = threading.Lock()
        self.births = {}  # device -> [(t, status doc)] of online births
        self.heap = {}  # device -> largest heap_alloc reported in health

    def _on_msg(self, t, topic, payload, retain):
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
                self.births.setdefault(dev, []).append((t, msg))
            elif kind == "health" and isinstance(msg.get("heap_alloc"), int):
                self.heap[dev] = max(self.heap.get(dev, 0), msg["heap_alloc"])

    def configs(self, host, port):
        a = self.a
        rec = {}
        if a.stable_s is not None:
            rec["stable_s"] = a.stable_s
        if a.first_window is not None and self.profile == "firmware":
            rec["first_window"] = a.first_window
        extra = {"profile": "baseline"} if self.profile == "baseline" else {}
        return [device_config("storm-%04d" % i, host, port, telemetry_interval=a.interval,
                              health_interval=a.health_interval,
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

    def wait_back(self, proxy, mark, who, timeout):
        """Poll until every client id in `who` has a CONNACK after mark; returns the map."""
        end = time.monotonic() + timeout
        want = set(who)
        while True:
            back = self.connected_since(proxy, mark)
            if want <= set(back):
                return back
            if time.monotonic() > end:
                return back
            time.sleep(0.2)

    def run(self):
        a = self.a
        broker = Mosquitto(os.path.join(self.dir, "broker")).start()
        proxy = FaultProxy(broker.host, broker.port, record="control").start()
        obs = Observer(broker.host, broker.port,
                       topics=("devices/+/telemetry", "devices/+/status", "devices/+/health"),
                       on_message=self._on_msg)
        fleet = []
        try:
            start = proxy.mark()
            fleet = start_fleet(self.configs(proxy.host, proxy.port), self.dir)
            ids = ["storm-%04d" % i for i in range(a.devices)]
            up = self.wait_back(proxy, start, ids, a.timeout)
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
            self.say("%s/%s: %d devices connected; cut in %.0f s"
                     % (self.scenario, self.profile, a.devices, max(0.0, wait)))
            time.sleep(max(0.0, wait))
            summary, series = self._storm(proxy)
            summary["watchdog_resets"] = sum(len(p.resets) for p in fleet)
        finally:
            # Output up to here is the run's; what follows is the graceful stop's.
            marks = stop_fleet(fleet, timeout=20)
            time.sleep(1.0)  # the last acknowledged messages reach the observer
            obs.close()
            proxy.stop()
            broker.stop()
            for i, p in enumerate(fleet):
                with open(os.path.join(self.dir, "devices-%d.log" % i), "w") as f:
                    f.write(p.output() + "\n")
        with self.lock:
            summary["telemetry"] = self.ledger.received
            summary["unexplained_loss"] = self.ledger.gaps()
            summary["duplicates"] = self.ledger.duplicates
            heap = dict(self.heap)
        summary.update(error_counts(fleet, marks))
        summary["heap_per_device_bytes"] = per_device_heap(heap, fleet)
        return summary, series

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
                later = [m for t, m in self.births.get(c, ()) if t >= t_cut]
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
                  "config_requests_during_recovery"):
            if f.get(k) and b.get(k) is not None:
                r[k] = round(b[k] / f[k], 1)
            elif b.get(k):
                r[k] = "inf"
        out[scenario] = r
    return out


def table(results):
    keys = ("devices", "peak_attempts_per_s", "mean_attempts_per_s", "peak_to_mean",
            "recovery_s", "total_attempts", "failed_attempts_per_device_max",
            "subscribes_during_recovery", "config_requests_during_recovery",
            "scheduled_refreshes_during_recovery", "unexplained_loss", "duplicates",
            "heap_per_device_bytes", "memory_errors", "stop_errors")
    lines = []
    for scenario, by in results.items():
        lines.append("\n%s\n| figure | firmware | baseline |\n|---|---|---|" % scenario)
        for k in keys:
            lines.append("| %s | %s | %s |" % (k, by.get("firmware", {}).get(k, "-"),
                                              by.get("baseline", {}).get(k, "-")))
    return "\n".join(lines)


def plot(series, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if s in series]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(10, 3.6 * len(scenarios)),
                             squeeze=False)
    for ax, s in zip(axes[:, 0], scenarios):
        for profile, style in (("baseline", "tab:red"), ("firmware", "tab:blue")):
            d = series[s].get(profile)
            if not d:
                continue
            xs = [d["t0"] + i * d["bin_s"] for i in range(len(d["attempts"]))]
            ys = [c / d["bin_s"] for c in d["attempts"]]
            ax.step(xs, ys, where="post", color=style, lw=1,
                    label="%s (%s)" % (profile, "fixed 2 s, clean session"
                                        if profile == "baseline" else "jittered, kept session"))
            if d["reopen_s"]:
                ax.axvline(d["reopen_s"], color="grey", ls="--", lw=0.8)
        ax.set_title(s)
        ax.set_xlabel("seconds since the cut (dashed: the proxy accepts again)")
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
            summary, s = Run(scenario, profile, a, workdir, say).run()
            results.setdefault(scenario, {})[profile] = summary
            series.setdefault(scenario, {})[profile] = s
            # Written after each run: a later one that fails keeps what was measured.
            if a.out:
                merge_json(a.out, {scenario: {profile: summary}})
            if a.series:
                merge_json(a.series, {scenario: {profile: s}})
    if a.series:
        if a.plot:
            with open(a.series) as f:
                plot(json.load(f), a.plot)
    return results


def main(argv=None):
    results = storm(argv)
    print(table(results))
    print("\nbaseline / firmware: %s" % json.dumps(ratios(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
