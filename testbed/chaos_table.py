"""Render the chaos suite's report (bench/chaos.json, written by `make chaos`) as the
Markdown table of README's "Chaos suite": one row per scenario run.

    .venv/bin/python testbed/chaos_table.py [bench/chaos.json] [--variant long|short]
"""
import argparse
import json
import sys


def _num(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = "%.2f" % v
    return "%s%s" % (v, unit)


def outcome(r):
    """lost (unexplained) / dropped (counted), duplicates, recovery and catch-up."""
    return (
        "%s / %s" % (_num(r.get("lost")), _num(r.get("dropped"))),
        _num(r.get("duplicates")),
        _num(r.get("recovery_s"), " s"),
        _num(r.get("caught_up_s"), " s"),
    )


def render(doc, variant=None):
    rows = [r for r in doc["scenarios"] if variant is None or r.get("variant") == variant]
    out = [
        "| scenario | injected | sent / received | lost / dropped | duplicates | recovery | "
        "caught up | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lost_dropped, dups, rec, caught = outcome(r)
        out.append("| %s (%s) | %s | %s / %s | %s | %s | %s | %s | %s |" % (
            r["name"], r.get("variant", ""), r.get("injected", "").replace("|", "/"),
            _num(r.get("sent")), _num(r.get("received")), lost_dropped, dups, rec, caught,
            "pass" if r.get("ok") else "**FAIL**"))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", nargs="?", default="bench/chaos.json")
    ap.add_argument("--variant", choices=("short", "long"), help="only this variant's rows")
    a = ap.parse_args(argv)
    try:
        with open(a.report) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print("chaos_table: cannot read %s: %s" % (a.report, e), file=sys.stderr)
        return 2
    print(render(doc, a.variant))
    print()
    print("%d scenario run(s), %s, %s CPU(s); lost = telemetry missing that no drop counter "
          "explains (0 = none), dropped = what the devices counted and reported." % (
              len(doc["scenarios"]), doc.get("generated", "?"), doc.get("cpus", "?")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
