# A test application (tests/host/test_app_api.py): every kind of sensor failure, a command
# that must run once, one that raises, events on demand, a setting and state.
import asyncio

_reads = [0]
runs = []


def flaky():
    _reads[0] += 1
    if _reads[0] % 3 == 0:
        raise OSError(5, "bus error (every third read)")
    return _reads[0]


async def stuck():
    await asyncio.Event().wait()


def garbage():
    return [1, 2]


def setup(dev):
    dev.sensor("flaky", flaky)
    dev.sensor("stuck", stuck, timeout_ms=300)
    dev.sensor("garbage", garbage)
    dev.sensor("good", lambda: {"a": 1, "on": True})
    dev.sensor("slow", lambda: 7, every=0.5)
    dev.setting("threshold", "num", 50, low=0, high=100,
                on_change=lambda v: dev.log("I", "threshold now %s" % v))
    dev.setting("mode", "choice", "eco", choices=("eco", "boost"))

    async def bump(args):
        runs.append(args)
        dev.log("I", "bump ran with %r" % (args,))
        dev.state("bumps", len(runs))
        return {"runs": len(runs)}

    async def fail(args):
        raise ValueError("fail asked for it")

    async def emit(args):
        for i in range(args.get("n", 1)):
            dev.event("tick", {"i": i}, qos=args.get("qos", 1))
        return {"emitted": args.get("n", 1)}

    dev.command("bump", bump)
    dev.command("fail", fail)
    dev.command("emit", emit)

    async def ticker():
        while True:
            dev.beat(1000)
            if dev.get("mode") == "boost":
                dev.event("beat", {"threshold": dev.get("threshold")})
            await asyncio.sleep(0.1)

    dev.task(ticker, "ticker")
    dev.state("mode", dev.get("mode"))
