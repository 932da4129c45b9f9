"""package.json files for `mpremote mip install`: every url names a file that exists, and
every device-side file is in some package."""
import glob
import json
import os

from tools.devices import ROOT


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
    } | {"main.py", "boot.py"}
    assert device_files <= covered, device_files - covered


def frozen_files():
    """Run manifest.py with the manifest commands recorded; the files it names."""
    named, includes = [], []
    here = ROOT  # relative paths in a manifest resolve against its own directory

    def package(name, files=None, base_path=".", opt=None):
        pkg = os.path.join(here, base_path, name)
        assert os.path.isdir(pkg), pkg
        if files is None:
            files = [os.path.relpath(p, pkg)
                     for p in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True)]
        named.extend(os.path.normpath(os.path.join(pkg, f)) for f in files)

    def module(name, base_path=".", opt=None):
        named.append(os.path.normpath(os.path.join(here, base_path, name)))

    def include(path):
        includes.append(path)

    with open(os.path.join(ROOT, "manifest.py")) as f:
        exec(compile(f.read(), "manifest.py", "exec"),
             {"package": package, "module": module, "include": include})
    return named, includes


def test_manifest_names_existing_files_and_freezes_every_board_module():
    named, includes = frozen_files()
    missing = [p for p in named if not os.path.isfile(p)]
    assert not missing, missing
    assert includes == ["$(PORT_DIR)/boards/manifest.py"]  # the port's own frozen modules
    rel = {os.path.relpath(p, ROOT) for p in named}
    device = {os.path.relpath(p, ROOT)
              for p in glob.glob(os.path.join(ROOT, "firmware", "**", "*.py"), recursive=True)
              + glob.glob(os.path.join(ROOT, "lib", "**", "*.py"), recursive=True)}
    # Everything a board runs is frozen; the Unix board is the simulator's only.
    assert device - rel == {os.path.join("firmware", "boards", "unix.py"),
                            os.path.join("firmware", "boards", "unixargs.py")}, device - rel
