"""The consumer-side gap/duplicate rule that sim.py and the README's contract rely on."""
from testbed.ledger import Ledger


def test_gaps_duplicates_and_explained_drops():
    l = Ledger()
    for seq in (1, 2, 2, 4, 5):
        l.telemetry("d", {"boot": 1, "seq": seq}, now=0)
    for seq in (1, 3):
        l.telemetry("d", {"boot": 2, "seq": seq}, now=0)
    assert l.duplicates == 1 and l.received == 7
    assert l.gaps() == 2  # boot 1 seq 3, boot 2 seq 2
    l.telemetry("d", {"boot": 2, "seq": 4, "dropped": 1}, now=0)
    assert l.gaps() == 1  # the device accounted for one missing message


def test_online_needs_recent_telemetry_and_online_status():
    l = Ledger()
    l.telemetry("a", {"boot": 1, "seq": 1}, now=100)
    l.telemetry("b", {"boot": 1, "seq": 1}, now=50)
    l.status["a"] = {"state": "online"}
    l.status["b"] = {"state": "online"}
    assert l.online(now=105) == 1
