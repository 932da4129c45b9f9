"""The reconnect storm, small: 50 real devices, a mass disconnect and a short refusal; and
10 through a region failover (the primary broker dies, comes back).

The full run (1,000 devices, 20 s) is `make storm`; this one checks the same properties at a
size `make test` can afford: the fleet comes back spread out, on its kept sessions (no
SUBSCRIBE, no config request), with nothing lost. The baseline profile runs too, so the
counters are shown to count: it must resubscribe and ask for config on every reconnect.
"""
import json
import os

import pytest

from testbed import storm

N = 50


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("storm")


@pytest.fixture(scope="module")
def results(workdir):
    d = workdir
    return storm.storm([
        "--devices", str(N), "--scenarios", "mass-disconnect", "--refuse", "5",
        "--stable-s", "3", "--interval", "1", "--health-interval", "5", "--quiet",
        "--workdir", str(d), "--out", str(d / "storm.json"), "--series", str(d / "series.json"),
        "--plot", str(d / "storm.png"),
    ])["mass-disconnect"]


def test_the_fleet_comes_back_spread_out_on_its_sessions(results):
    f = results["firmware"]
    assert f["cut"] == N and f["all_back"], f
    # Back within first_window + half the refusal (5 + 2.5 s) of the reopening: the delay
    # after a failure is bounded by the time already offline. 1.5 s more for a busy
    # machine; with the ceiling by count alone, a device failing just before the reopening
    # could wait 10 s.
    assert f["recovery_s"] <= 5 + 5 / 2 + 1.5, f
    # 50 first attempts drawn over the 5 s window average one per 100 ms; a simulation of
    # the policy never put more than 9 into any 100 ms (3,000 runs). The fixed 2 s retry
    # puts the whole fleet into one.
    assert f["peak_attempts_per_s"] * storm.BIN_S <= N / 4, f
    assert f["peak_attempts_per_s"] < results["baseline"]["peak_attempts_per_s"]
    # 5 s of refusal: at most 2 failures with retries growing from the first window
    # (2.5 s at least after the first failure), against 2 or 3 at a fixed 2 s.
    assert f["failed_attempts_per_device_max"] <= 3, f
    assert f["subscribes_during_recovery"] == 0, f
    assert f["config_requests_during_recovery"] == 0, f
    assert f["unexplained_loss"] == 0, f
    # At least once: a message the broker had when the cut came but whose PUBACK was lost
    # is sent again; never more than the in-flight window of each device.
    assert f["duplicates"] <= N * 16, f
    assert f["telemetry"] >= N * 10, f
    assert f["memory_errors"] == 0 and f["watchdog_resets"] == 0, f


def test_the_baseline_resubscribes_and_asks_for_config_every_time(results):
    b = results["baseline"]
    assert b["all_back"], b
    # Clean session: every reconnect subscribes again, config topics included.
    assert b["subscribes_during_recovery"] >= N, b
    assert b["config_requests_during_recovery"] >= N, b
    assert b["unexplained_loss"] == 0, b


def test_summary_file_has_the_issue_shape(results, workdir):
    with open(os.path.join(workdir, "storm.json")) as f:
        data = json.load(f)
    for profile in ("firmware", "baseline"):
        s = data["mass-disconnect"][profile]
        for k in ("devices", "peak_attempts_per_s", "mean_attempts_per_s", "peak_to_mean",
                  "recovery_s", "subscribes_during_recovery",
                  "config_requests_during_recovery", "unexplained_loss", "duplicates",
                  "total_attempts"):
            assert k in s, (profile, k)
    assert os.path.getsize(os.path.join(workdir, "storm.png")) > 10000


# ---- region-failover, small -------------------------------------------------------------

NF = 10
# Short failover settings: a device fails over 3 s into the failing attempts, probes the
# primary every 1-3 s (2 s jittered) and returns within a 6 s window.
AFTER_S, PROBE_S, WINDOW_S = 3, 2, 6


@pytest.fixture(scope="module")
def failover(tmp_path_factory):
    d = tmp_path_factory.mktemp("failover")
    return storm.storm([
        "--devices", str(NF), "--scenarios", "region-failover", "--down", "10",
        "--after-s", str(AFTER_S), "--probe-s", str(PROBE_S),
        "--failback-window", str(WINDOW_S), "--first-window", "2",
        "--stable-s", "3", "--interval", "1", "--health-interval", "5", "--quiet",
        "--workdir", str(d), "--out", str(d / "storm.json"), "--series", str(d / "series.json"),
        "--plot", str(d / "storm.png"),
    ])["region-failover"]


def test_region_failover_moves_the_fleet_and_brings_it_back_spread_out(failover):
    f = failover["firmware"]
    assert f["cut"] == NF and f["all_back"], f
    # Everyone reached the secondary, and told so in its birth message: the endpoint, the
    # broker, where it came from and how long the move took.
    assert f["births_naming_the_move"] == NF, f
    assert AFTER_S <= f["failover_s_min"] and f["failover_s_max"] <= f["down_s"], f
    assert f["birth_failover_s_max"] is not None, f
    # The secondary is a new broker to them: one session set up each (no session there).
    assert f["subscribes_during_recovery"] >= NF, f
    # Back on the primary, all of them, on the sessions it kept: no SUBSCRIBE; within the
    # longest probe period plus the window (the wait is bounded by that plus a margin).
    assert f["all_failed_back"] and f["stuck_on_secondary"] == 0, f
    # ... and stayed: one connection each, all of them open at the end.
    assert f["failback_reconnects"] == 0 and f["not_on_primary"] == 0, f
    assert f["failback_subscribes"] == 0, f
    assert f["births_naming_the_return"] == NF, f
    # Spread over the window: ten returns drawn from 6 s are not all within a second
    # (10 uniform draws fall into one second of six with probability below 1e-5).
    assert f["failback_last_s"] - f["failback_first_s"] >= 1.0, f
    assert f["failback_busiest_second"] < NF, f
    assert f["failback_probes"] >= 1, "the primary was probed before the return"
    assert f["unexplained_loss"] == 0, f
    assert f["telemetry"] >= NF * 10, f
    assert f["memory_errors"] == 0 and f["watchdog_resets"] == 0, f
    # The health counters saw the move (health every 5 s).
    assert f["failovers_reported"] >= NF, f


def test_region_failover_baseline_returns_at_once_and_loses_nothing(failover):
    b = failover["baseline"]
    assert b["all_back"] and b["all_failed_back"] and b["stuck_on_secondary"] == 0, b
    assert b["not_on_primary"] == 0, b
    # No window: every device is back within two of its 2 s probe periods.
    assert b["failback_last_s"] <= 2 * 2.0 + 3.0, b
    # Clean session: it subscribes again on the primary too.
    assert b["failback_subscribes"] >= NF, b
    assert b["unexplained_loss"] == 0, b


def test_region_failover_summary_has_the_other_scenarios_keys(failover):
    for profile in ("firmware", "baseline"):
        s = failover[profile]
        for k in ("devices", "peak_attempts_per_s", "mean_attempts_per_s", "peak_to_mean",
                  "recovery_s", "subscribes_during_recovery",
                  "config_requests_during_recovery", "unexplained_loss", "duplicates",
                  "total_attempts", "failed_attempts_per_device_max", "heap_per_device_bytes",
                  "memory_errors", "stop_errors", "watchdog_resets",
                  "failback_peak_attempts_per_s", "stuck_on_secondary"):
            assert k in s, (profile, k)


def test_the_proxy_stops_listening_so_a_bare_tcp_connect_is_refused(broker):
    import socket
    import time

    from testbed.proxy import FaultProxy

    with FaultProxy(broker.host, broker.port) as proxy:
        kept = socket.create_connection((proxy.host, proxy.port), timeout=5)
        try:
            end = time.monotonic() + 10
            while proxy.open_connections < 1 and time.monotonic() < end:
                time.sleep(0.02)  # the proxy has connected it through to the broker
            proxy.listen(False)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((proxy.host, proxy.port), timeout=5)
            assert proxy.cut() == 1, "open connections stay until cut"
            proxy.listen(True)
            socket.create_connection((proxy.host, proxy.port), timeout=5).close()
            end = time.monotonic() + 10
            while len(proxy.attempts) < 2 and time.monotonic() < end:
                time.sleep(0.02)
            # The refused one never reached the proxy: two attempts, both accepted.
            assert [o for _, o in proxy.attempts] == ["accepted", "accepted"]
        finally:
            kept.close()


def test_the_proxy_cuts_the_share_it_is_asked_to_and_names_the_clients(broker):
    import random
    import time

    import paho.mqtt.client as mqtt

    from testbed.proxy import FaultProxy

    with FaultProxy(broker.host, broker.port, record="control") as proxy:
        clients = []
        for i in range(10):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="c%d" % i)
            c.connect(proxy.host, proxy.port)
            c.loop_start()
            clients.append(c)
        end = time.monotonic() + 10
        while len(proxy.packets_since((0, 0, 0), "CONNACK")) < 10 and time.monotonic() < end:
            time.sleep(0.05)
        try:
            assert proxy.cut(0.3, random.Random(1)) == 3
            assert len(proxy.last_cut) == 3 and set(proxy.last_cut) <= {"c%d" % i for i in range(10)}
            assert proxy.open_connections == 7
        finally:
            for c in clients:
                c.loop_stop()
                c.disconnect()
