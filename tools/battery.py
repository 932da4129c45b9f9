# Battery life of a deep-sleeping board (host-side, CPython, stdlib only).
#
# The device wakes every P seconds, is awake A ms at an active current, then sleeps at a
# sleep current. The model is deliberately this simple, nothing more:
#     charge per cycle (C) = I_active * A + I_sleep * (P - A)
#     average current (mA) = charge per cycle / P * 1000
#     days                 = capacity_mAh * usable / average_mA / 24
# No boot/Wi-Fi current profile, no regulator losses, self-discharge, temperature or
# voltage sag: only two constant currents. --volts only prints the energy per cycle.
#
#     python tools/battery.py --active-ma 142 --sleep-ua 10 --capacity-mah 2500 \
#         --awake-ms 774 300 --period-s 300 60 [--usable 0.8] [--volts 5] [--json] \
#         [--from-bench bench/duty.json]
import argparse
import json
import math
import os
import sys

DEFAULT_PERIOD_S = 300.0
DEFAULT_USABLE = 0.8
DEFAULT_VOLTS = 5.0


def battery_days(active_ma, sleep_ua, capacity_mah, awake_ms, period_s, usable=DEFAULT_USABLE):
    """One wake cycle of awake_ms at active_ma, then sleep_ua for the rest of period_s.
    Returns {"charge_mc": millicoulombs per cycle, "avg_ma": average mA,
    "days": days on capacity_mah * usable}."""
    if not (0 < awake_ms < period_s * 1000.0):
        raise ValueError("awake time must be > 0 and < the period")
    if not (active_ma >= 0 and sleep_ua >= 0):
        raise ValueError("currents must be >= 0")
    if not (capacity_mah > 0 and 0 < usable <= 1):
        raise ValueError("capacity must be > 0 and usable in (0, 1]")
    awake_s = awake_ms / 1000.0
    # mA * s = mC; uA / 1000 = mA
    charge_mc = active_ma * awake_s + sleep_ua / 1000.0 * (period_s - awake_s)
    avg_ma = charge_mc / period_s
    if avg_ma <= 0:
        raise ValueError("average current is zero (both currents are zero)")
    days = capacity_mah * usable / avg_ma / 24.0
    return {"charge_mc": charge_mc, "avg_ma": avg_ma, "days": days}


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def bench_awake(path):
    """[(label, awake_ms)] from a bench result file's "duty_awake_ms": a dict whose values
    are {"median": ms, ...} or plain numbers (a plain number for the whole key is taken
    too). Raises ValueError with a readable reason."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError("cannot read %s: %s" % (path, e))
    if not isinstance(data, dict) or "duty_awake_ms" not in data:
        raise ValueError("%s has no \"duty_awake_ms\"" % path)
    duty = data["duty_awake_ms"]
    name = os.path.basename(path)
    if _number(duty):
        return [(name, float(duty))]
    if not isinstance(duty, dict) or not duty:
        raise ValueError("%s: \"duty_awake_ms\" is neither a number nor a non-empty dict" % path)
    out = []
    for key, val in duty.items():
        if _number(val):
            out.append(("%s:%s" % (name, key), float(val)))
        elif isinstance(val, dict) and _number(val.get("median")):
            out.append(("%s:%s median" % (name, key), float(val["median"])))
        else:
            raise ValueError("%s: duty_awake_ms[%r] has no numeric median" % (path, key))
    return out


def rows(args, awake):
    """One dict per (awake, period), awake times in the order given."""
    out = []
    for label, awake_ms in awake:
        for period_s in args.period_s:
            r = battery_days(args.active_ma, args.sleep_ua, args.capacity_mah, awake_ms,
                             period_s, args.usable)
            out.append({
                "source": label,
                "awake_ms": awake_ms,
                "period_s": period_s,
                "charge_mc": r["charge_mc"],
                "charge_c": r["charge_mc"] / 1000.0,
                "energy_j": r["charge_mc"] / 1000.0 * args.volts,
                "volts": args.volts,
                "avg_ma": r["avg_ma"],
                "days": r["days"],
            })
    return out


def table(rs, volts):
    head = ["source", "awake ms", "period s", "mC/cycle", "C/cycle",
            "J/cycle@%gV" % volts, "avg mA", "days"]
    body = [[r["source"], "%g" % r["awake_ms"], "%g" % r["period_s"], "%.2f" % r["charge_mc"],
             "%.4f" % r["charge_c"], "%.4f" % r["energy_j"], "%.4f" % r["avg_ma"],
             "%.1f" % r["days"]] for r in rs]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def parser():
    p = argparse.ArgumentParser(
        description="Average current, charge per wake cycle and days of battery for a board "
                    "that deep-sleeps and wakes every PERIOD seconds (two-current model).")
    p.add_argument("--active-ma", type=float, required=True, help="current while awake, mA")
    p.add_argument("--sleep-ua", type=float, required=True, help="current in deep sleep, uA")
    p.add_argument("--capacity-mah", type=float, required=True, help="rated capacity, mAh")
    p.add_argument("--awake-ms", type=float, nargs="+", default=[],
                   help="time awake per wake, ms (several to compare side by side)")
    p.add_argument("--period-s", type=float, nargs="+", default=[DEFAULT_PERIOD_S],
                   help="wake period(s), s (default %g)" % DEFAULT_PERIOD_S)
    p.add_argument("--usable", type=float, default=DEFAULT_USABLE,
                   help="usable fraction of the rated capacity (default %g)" % DEFAULT_USABLE)
    p.add_argument("--volts", type=float, default=DEFAULT_VOLTS,
                   help="supply voltage, only to print joules per cycle (default %g)"
                   % DEFAULT_VOLTS)
    p.add_argument("--from-bench", metavar="FILE",
                   help="add the median(s) of duty_awake_ms in a bench result file")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per (awake, period) row instead of a table")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not (args.active_ma >= 0 and math.isfinite(args.active_ma)):
        p.error("--active-ma must be >= 0 (got %g)" % args.active_ma)
    if not (args.sleep_ua >= 0 and math.isfinite(args.sleep_ua)):
        p.error("--sleep-ua must be >= 0 (got %g)" % args.sleep_ua)
    if args.active_ma == 0 and args.sleep_ua == 0:
        p.error("--active-ma and --sleep-ua are both zero: the battery never drains")
    if not (args.capacity_mah > 0 and math.isfinite(args.capacity_mah)):
        p.error("--capacity-mah must be > 0 (got %g)" % args.capacity_mah)
    if not (0 < args.usable <= 1):
        p.error("--usable must be in (0, 1] (got %g)" % args.usable)
    if not (args.volts > 0 and math.isfinite(args.volts)):
        p.error("--volts must be > 0 (got %g)" % args.volts)
    for period_s in args.period_s:
        if not (period_s > 0 and math.isfinite(period_s)):
            p.error("--period-s must be > 0 (got %g)" % period_s)
    awake = [("given", a) for a in args.awake_ms]
    if args.from_bench:
        try:
            awake += bench_awake(args.from_bench)
        except ValueError as e:
            p.error("--from-bench: %s" % e)
    if not awake:
        p.error("give --awake-ms and/or --from-bench")
    for label, awake_ms in awake:
        for period_s in args.period_s:
            if not (0 < awake_ms < period_s * 1000.0):
                p.error("awake time %g ms (%s) must be > 0 and < the period %g s"
                        % (awake_ms, label, period_s))
    rs = rows(args, awake)
    if args.json:
        for r in rs:
            print(json.dumps(r))
    else:
        print("active %g mA, sleep %g uA, %g mAh x %g usable"
              % (args.active_ma, args.sleep_ua, args.capacity_mah, args.usable))
        print(table(rs, args.volts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
