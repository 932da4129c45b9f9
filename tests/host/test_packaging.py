"""package.json files for `mpremote mip install`: every url names a file that exists, and
every device-side file is in some package."""
import glob
import json
import os

from testbed.devices import ROOT


def packages():
    return [os.path.join(ROOT, "package.json")] + glob.glob(os.path.join(ROOT, "lib", "*", "package.json"))


def test_every_url_exists_and_every_device_file_is_packaged():
    covered = set()
    for pj in packages():
        with open(pj) as f:
            doc = json.load(f)
        assert doc["version"]
        base = os.path.dirname(pj)
        for dest, src in doc["urls"]:
            path = os.path.normpath(os.path.join(base, src))
            assert os.path.isfile(path), (pj, src)
            covered.add(os.path.relpath(path, ROOT))
    device_files = {
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "firmware", "**", "*.py"), recursive=True)
        + glob.glob(os.path.join(ROOT, "lib", "**", "*.py"), recursive=True)
    } | {"main.py", "boot.py", "otaboot.py"}
    assert device_files <= covered, device_files - covered


def frozen_files(manifest="manifest.py"):
    """Run a manifest with the manifest commands recorded, following its includes of files in
    this repo; (the files it names, the includes it leaves to the MicroPython build)."""
    named, includes = [], []

    def run(path):
        here = os.path.dirname(path)  # a manifest's relative paths resolve against its directory

        def package(name, files=None, base_path=".", opt=None):
            pkg = os.path.join(here, base_path, name)
            assert os.path.isdir(pkg), pkg
            if files is None:
                files = [os.path.relpath(p, pkg)
                         for p in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True)]
            named.extend(os.path.normpath(os.path.join(pkg, f)) for f in files)

        def module(name, base_path=".", opt=None):
            named.append(os.path.normpath(os.path.join(here, base_path, name)))

        def include(inc):
            if inc.startswith("$("):
                includes.append(inc)  # the port's or MicroPython's own
            else:
                target = os.path.normpath(os.path.join(here, inc))
                assert os.path.isfile(target), (path, inc)
                run(target)

        with open(path) as f:
            exec(compile(f.read(), path, "exec"),
                 {"package": package, "module": module, "include": include})

    run(os.path.join(ROOT, manifest))
    return named, includes


def _device_files():
    return {os.path.relpath(p, ROOT)
            for p in glob.glob(os.path.join(ROOT, "firmware", "**", "*.py"), recursive=True)
            + glob.glob(os.path.join(ROOT, "lib", "**", "*.py"), recursive=True)} | {"otaboot.py", "unixflash.py"}


UNIX_BOARD = {os.path.join("firmware", "boards", "unix.py"),
              os.path.join("firmware", "boards", "unixargs.py"),
              os.path.join("firmware", "boards", "unixhw.py"), "unixflash.py"}


def test_manifest_names_existing_files_and_freezes_every_board_module():
    named, includes = frozen_files()
    missing = [p for p in named if not os.path.isfile(p)]
    assert not missing, missing
    assert includes == ["$(PORT_DIR)/boards/manifest.py"]  # the port's own frozen modules
    rel = [os.path.relpath(p, ROOT) for p in named]
    assert len(rel) == len(set(rel)), "a file frozen twice"
    # Everything a board runs is frozen; the Unix board is the simulator's only.
    assert _device_files() - set(rel) == UNIX_BOARD, _device_files() - set(rel)


def test_unix_manifest_freezes_the_same_firmware_plus_the_unix_board():
    """manifest_unix.py (make board-model): the boards' lists (shared, not copied), the Unix
    board modules, asyncio (the Unix port has no boards/manifest.py) and the ssl shim."""
    named, includes = frozen_files("manifest_unix.py")
    missing = [p for p in named if not os.path.isfile(p)]
    assert not missing, missing
    assert includes == ["$(MPY_DIR)/extmod/asyncio"]
    rel = [os.path.relpath(p, ROOT) for p in named]
    assert len(rel) == len(set(rel)), "a file frozen twice"
    boards = {os.path.relpath(p, ROOT) for p in frozen_files()[0]}
    assert set(rel) == boards | UNIX_BOARD | {os.path.join("testbed", "board_model", "ssl.py")}
    assert _device_files() <= set(rel)
    with open(os.path.join(ROOT, "manifest_unix.py")) as f:
        assert "FIRMWARE = " not in f.read()  # the list lives in manifest_common.py only
