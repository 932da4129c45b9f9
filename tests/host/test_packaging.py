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
