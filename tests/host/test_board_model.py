"""The board-model plumbing that CI can check without a MicroPython checkout: `make
board-model` says what it needs, `make mpy` and build_mpy leave its binaries alone, and a
binary with the firmware frozen in is recognised and run from a directory of its own (a
stand-in here: the venv's Unix port with the checkout on MICROPYPATH, which finds
`firmware` from any directory, as a frozen build does)."""
import json
import os
import shutil
import subprocess
import sys

from testbed.devices import ROOT, binary_info, frozen_main, micropython_path
from testbed.sim import build_mpy


def fake_frozen(tmp_path):
    """A 'binary' that finds the firmware from anywhere, like one with it frozen in."""
    path = tmp_path / "frozen-micropython"
    path.write_text('#!/bin/sh\nMICROPYPATH=".frozen:%s:%s/lib" exec "%s" "$@"\n'
                    % (ROOT, ROOT, micropython_path()))
    path.chmod(0o755)
    return str(path)


def test_board_model_without_a_checkout_says_what_it_needs():
    r = subprocess.run(["make", "-s", "board-model", "MPY_DIR="], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    for need in ("MPY_DIR", "gcc-multilib", "git -C $MPY_DIR submodule update --init lib/mbedtls"):
        assert need in r.stderr, r.stderr


def test_board_model_refuses_a_directory_that_is_not_micropython(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "testbed", "board_model", "build.sh")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MPY_DIR=str(tmp_path)))
    assert r.returncode == 2
    assert "is not a MicroPython checkout" in r.stderr, r.stderr


def test_build_mpy_keeps_the_board_model_binaries(tmp_path):
    root = tmp_path / "repo"
    for d in ("firmware", "lib"):
        shutil.copytree(os.path.join(ROOT, d), root / d)
    for f in ("boot.py", "main.py", "otaboot.py", "unixflash.py"):
        shutil.copy(os.path.join(ROOT, f), root / f)
    kept = root / "build" / "board-model" / "micropython"
    kept.parent.mkdir(parents=True)
    kept.write_text("binary")
    mcu = root / "build" / "mcu" / "m0" / "firmware.elf"  # make mcu's
    mcu.parent.mkdir(parents=True)
    mcu.write_text("elf")
    (root / "build" / "stale.mpy").write_text("old")
    build_mpy(str(root))
    assert kept.read_text() == "binary" and mcu.read_text() == "elf"
    assert not (root / "build" / "stale.mpy").exists()
    assert (root / "build" / "firmware" / "app.mpy").exists()
    # The loader's modules, which main.py imports first (once missing: every boot died).
    assert (root / "build" / "otaboot.mpy").exists()
    assert (root / "build" / "unixflash.mpy").exists()


def test_binary_info_tells_a_frozen_build_from_the_venv_port(tmp_path):
    venv = binary_info()
    assert venv["bits"] == 64 and not venv["frozen"] and venv["tls"]
    fake = binary_info(fake_frozen(tmp_path))
    assert fake["frozen"] and fake["version"] == venv["version"]


def test_a_frozen_build_runs_main_py_away_from_the_checkout(tmp_path, fleet, observer):
    main = frozen_main(str(tmp_path))
    run = os.path.dirname(main)
    assert sorted(os.listdir(run)) == ["boot.py", "main.py"]
    p = fleet.start(fleet.spec("fz1", telemetry_interval=0.2), micropython=fake_frozen(tmp_path))
    assert os.path.dirname(p.main) == run and p.argv()[0].endswith("frozen-micropython")
    observer.wait(lambda m: len(observer.json("fz1/telemetry")) >= 2, 15, "telemetry")


def test_a_frozen_build_refuses_a_main_py_beside_firmware(tmp_path, fleet):
    try:
        fleet.start(fleet.spec("fz2"), micropython=fake_frozen(tmp_path),
                    main=os.path.join(ROOT, "main.py"))
    except ValueError as e:
        assert "would replace it" in str(e)
    else:
        raise AssertionError("a frozen build ran main.py from the checkout")


def test_sim_refuses_build_with_a_frozen_binary(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--build",
                        "--micropython", fake_frozen(tmp_path), "--duration", "1",
                        "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "would replace the firmware frozen" in r.stderr


def test_sim_runs_another_binary(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--quiet",
                        "--micropython", fake_frozen(tmp_path), "--duration", "4",
                        "--interval", "0.2", "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["telemetry"] >= 5 and summary["memory_errors"] == 0, summary
    assert os.path.isfile(tmp_path / "w" / "frozen-run" / "main.py")
