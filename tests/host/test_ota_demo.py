"""`make ota-demo` at test size: 20 real devices (one process each) through a staged rollout
(testbed/ota_demo.py): v2 confirmed everywhere, v3 (crashes at boot) rolled back everywhere,
v4 (signed by an untrusted key) refused everywhere, no telemetry lost on the way.

Slow (about a minute and a half on 2 cores): every phase waits for the devices' own reports,
never a fixed time, so the length is the window's and the fleet's boots."""
import json

import pytest

from testbed import ota_demo

N = 20
WINDOW_S = 8


@pytest.mark.slow
def test_a_staged_rollout_confirms_rolls_back_and_refuses(tmp_path, capsys):
    rc = ota_demo.main(["--devices", str(N), "--window", str(WINDOW_S),
                        "--workdir", str(tmp_path / "demo")])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out  # exactly one line on stdout: the summary
    s = json.loads(out[0])
    assert rc == 0, s
    assert s["devices"] == N
    assert s["confirmed"] == s["rolled_back"] == s["refused"] == N, s
    assert s["gaps"] == 0, s
    assert s["fw_after"] == {"2.0.0": N}, s
    # The first manifest requests, one per device, spread over the window: each device
    # waits uniform(0, W). 20 draws all within 1 s of each other: p < 1e-15.
    assert s["download_starts_attributed"] == N, s
    assert 1.0 < s["download_start_spread_s"] <= WINDOW_S + 5, s
    assert s["max_concurrent_downloads"] >= 1, s
    assert s["boot_numbers_carried"] is True, s
    # The loader's boot loop: every device gave v3 its 3 boots (otaboot.TRIES), then ran 2.0.0.
    assert sum(s["rollback_reasons"].values()) == N, s
    assert all("not confirmed after 3 boots" in r for r in s["rollback_reasons"]), s
    assert all("does not trust" in r for r in s["refusal_reasons"]), s
    assert s["process_exits"] == 3 * N, s  # v3's crashes, nothing else
    assert s["watchdog_resets"] == 0 and s["memory_errors"] == 0, s
