"""The bare-metal test rig (testbed/mcu: `make mcu`, `make test-mcu`). What CI can check
without a MicroPython checkout: the build says what it needs, the skip tables name tests
that exist, and the ROMFS image the guest mounts reads back. With a build in build/mcu/m0
(never in CI) also the harness itself under QEMU: a short module passes, and a failing test
fails the run."""
import os
import shutil
import subprocess
import sys

import pytest

from testbed.devices import ROOT
from testbed.mcu import qemu
from testbed.mcu import test as mcu
from tools.venv import venv_tool

M0_ELF = os.path.join(ROOT, "build", "mcu", "m0", "firmware.elf")


def test_make_mcu_without_a_checkout_says_what_it_needs():
    r = subprocess.run(["make", "-s", "mcu", "MPY_DIR="], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    for need in ("MPY_DIR", "qemu-system-arm", "gcc-riscv64-unknown-elf",
                 "picolibc-riscv64-unknown-elf"):
        assert need in r.stderr, r.stderr


def test_mcu_build_refuses_a_directory_that_is_not_micropython(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "testbed", "mcu", "build.sh")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MPY_DIR=str(tmp_path)))
    assert r.returncode == 2
    assert "is not a MicroPython checkout" in r.stderr, r.stderr


def test_skip_tables_name_tests_that_exist():
    """A renamed test must not leave a skip behind (nor run, unskipped, where it cannot)."""
    for module, name in list(mcu.SKIP_TESTS) + list(mcu.NEEDS_HEAP):
        assert name in mcu.test_names(module), (module, name)
    for module in mcu.SPLIT:
        assert mcu.test_names(module), module


def test_frozen_sources_are_the_boards_manifest_lists():
    files = [os.path.relpath(p, ROOT) for p in mcu.frozen_sources()]
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    assert os.path.join("lib", "outbox", "flashlog.py") in files
    assert os.path.join("firmware", "boards", "rp2.py") in files
    assert os.path.join("firmware", "boards", "unix.py") not in files  # the simulator's only
    assert "otaboot.py" in files


def test_romfs_image_reads_back_in_micropython(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "x.txt").write_bytes(b"hello")
    (tree / "big.bin").write_bytes(bytes(range(256)) * 1000)  # a length of 3 varuint bytes
    (tree / "odd").write_bytes(b"1")
    image = tmp_path / "rom.img"
    image.write_bytes(qemu.romfs(str(tree)))
    assert image.stat().st_size % 2 == 0
    probe = ("import vfs, os\n"
             "vfs.mount(vfs.VfsRom(open(%r, 'rb').read()), '/rom')\n"
             "print(sorted(os.listdir('/rom')), os.listdir('/rom/a/b'))\n"
             "print(open('/rom/a/b/x.txt').read(), len(open('/rom/big.bin', 'rb').read()))\n"
             "print(open('/rom/big.bin', 'rb').read()[255:258])\n" % str(image))
    r = subprocess.run([venv_tool("micropython"), "-c", probe], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["['a', 'big.bin', 'odd'] ['x.txt']", "hello 256000",
                                     "b'\\xff\\x00\\x01'"], r.stdout


def _runnable():
    if not os.path.exists(M0_ELF):
        return ("no build/mcu/m0/firmware.elf: `make mcu MPY_DIR=/path/to/micropython` builds"
                " it (CI has no MicroPython checkout, so this runs only where one was built)")
    why = mcu.check(["m0"], allow_stale=False)
    return why


@pytest.fixture
def m0():
    why = _runnable()
    if why:
        pytest.skip(why)


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "testbed", "mcu", "test.py"),
                           "--board", "m0"] + list(args), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_a_short_module_passes_under_qemu(m0):
    r = _run("-k", "test_codec")
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(mcu.test_names("test_codec"))
    assert "m0    test_codec         %3d passed   0 failed   0 skipped" % n in r.stdout, r.stdout
    assert "test-mcu m0    %d passed, 0 failed, 0 skipped" % n in r.stdout, r.stdout


def test_a_failing_test_fails_the_run_with_its_traceback(m0, tmp_path):
    shutil.copy(os.path.join(ROOT, "tests", "mpy", "mpyutil.py"), tmp_path)
    (tmp_path / "test_rig.py").write_text(
        "import sys\n"
        "def test_on_the_guest():\n"
        "    assert sys.platform == 'qemu' and sys.maxsize == 2**31 - 1\n"
        "def test_fails():\n"
        "    assert 1 + 1 == 3, 'on purpose'\n"
        "async def test_sleeps():\n"
        "    import asyncio\n"
        "    await asyncio.sleep_ms(20)\n")
    r = _run("--tests-dir", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 passed   1 failed   0 skipped" in r.stdout, r.stdout
    assert "test_rig.py\", line 5, in test_fails" in r.stdout and "on purpose" in r.stdout


def test_the_skip_table_is_printed_with_reasons(m0):
    r = _run("-k", "test_ntp")
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = [n for (m, n) in mcu.SKIP_TESTS if m == "test_ntp"]
    for name in skipped:
        assert "skipped %s: %s" % (name, mcu.NO_SOCKETS) in r.stdout, r.stdout
    ran = len(mcu.test_names("test_ntp")) - len(skipped)
    assert ran > 0  # the codec's tests run
    assert "%3d passed   0 failed %3d skipped" % (ran, len(skipped)) in r.stdout, r.stdout
