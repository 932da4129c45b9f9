"""Shared fixtures: a real mosquitto per test, Unix-port device processes, a paho observer;
and the collector that runs tests/mpy/test_*.py inside MicroPython, one item per function."""
import ast
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import DeviceProcess, Spec, device_config, micropython_path  # noqa: E402
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import FaultProxy  # noqa: E402

MPY_RUNNER = os.path.join(ROOT, "tests", "mpy", "runner.py")
MARK = "@@MPY "


# ---- MicroPython unit tests ------------------------------------------------------------


def pytest_pycollect_makemodule(module_path, parent):
    # Files under tests/mpy are MicroPython: run them in the Unix port instead of importing.
    if module_path.parent.name == "mpy":
        return MpyFile.from_parent(parent, path=module_path)
    return None


class MpyFile(pytest.File):
    """A test module run by the Unix port. Collected by reading its source (CPython never
    imports it); the whole file runs once, and each function reports its own result."""

    def collect(self):
        tree = ast.parse(self.path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
                "test_"
            ):
                yield MpyItem.from_parent(self, name=node.name)

    def results(self):
        if not hasattr(self, "_results"):
            proc = subprocess.run(
                [micropython_path(), MPY_RUNNER, str(self.path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                # A whole module in one process: test_outbox's power-cut sweeps copy flash
                # images thousands of times (80 s idle, 240 s on a loaded 2-core host).
                timeout=900,
            )
            res = {}
            for line in proc.stdout.splitlines():
                if line.startswith(MARK):
                    r = json.loads(line[len(MARK):])
                    res[r["name"]] = r
            self._results = res
            self._output = proc.stdout + proc.stderr
        return self._results


class MpyFailure(Exception):
    pass


class MpyItem(pytest.Item):
    def runtest(self):
        res = self.parent.results()
        r = res.get(self.name)
        if r is None:
            raise MpyFailure(
                "no result from MicroPython (crashed?); output:\n" + self.parent._output[-3000:]
            )
        if not r["ok"]:
            raise MpyFailure(r["tb"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MpyFailure):
            return "MicroPython test %s failed:\n%s" % (self.name, excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, "mpy: %s" % self.name


# ---- real broker and devices -----------------------------------------------------------


@pytest.fixture
def broker(tmp_path):
    m = Mosquitto(tmp_path / "broker").start()
    yield m
    m.stop()


@pytest.fixture
def observer(broker):
    o = Observer(broker.host, broker.port)
    yield o
    o.close()


class Fleet:
    """Starts device processes for a test and always stops them afterwards."""

    def __init__(self, tmp_path, broker):
        self.tmp = tmp_path
        self.broker = broker
        self.endpoint = (broker.host, broker.port)  # where device configs point
        self.procs = []

    def config(self, device_id, **over):
        return device_config(device_id, self.endpoint[0], self.endpoint[1], **over)

    def start(self, *specs, **kw):
        p = DeviceProcess(list(specs), str(self.tmp), **kw).start()
        self.procs.append(p)
        return p

    def device(self, device_id, **over):
        """One device with a valid config in its own process."""
        return self.start(self.spec(device_id, **over))

    def spec(self, device_id, **over):
        return Spec(str(self.tmp / (device_id + ".img")), config=self.config(device_id, **over))

    def close(self):
        for p in self.procs:
            p.kill()


@pytest.fixture
def fleet(tmp_path, broker):
    f = Fleet(tmp_path, broker)
    yield f
    f.close()


@pytest.fixture
def proxy(broker, fleet):
    """A fault-injecting proxy in front of the broker; the fleet's devices connect through it."""
    p = FaultProxy(broker.host, broker.port).start()
    fleet.endpoint = (p.host, p.port)
    yield p
    p.stop()


# ---- chaos suite report ----------------------------------------------------------------


@pytest.fixture(scope="session")
def chaos_report():
    """Rows of the chaos suite (tests/host/test_chaos.py): each scenario appends a dict.
    With CHAOS_REPORT=PATH in the environment (`make chaos`) they are written to PATH as
    JSON when the session ends, failed scenarios included (their row says "ok": false)."""
    rows = []
    yield rows
    path = os.environ.get("CHAOS_REPORT")
    if path and rows:
        doc = {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(),
            "scenarios": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
