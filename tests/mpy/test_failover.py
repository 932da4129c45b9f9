# Failover policy (firmware/failover.py): when a device leaves its broker for the next one.
from backoff import Backoff
from firmware.bootconfig import FAILOVER, validate
from firmware.failover import Failover


class Low:
    """Every draw at the low end: the most attempts a device can make in a given time."""

    def uniform(self, a, b):
        return a

    def random(self):
        return 0.0


class Client:
    def __init__(self, n):
        self.endpoints = [{}] * n
        self.ep = 0

    def endpoint_name(self, i=None):
        return "broker%d" % (self.ep if i is None else i)


def _defaults():
    return {k: v[0] for k, v in FAILOVER.items()}


def _policy(cfg, n=2, baseline=False):
    now = [0.0]
    fo = Failover(cfg, Low(), lambda: now[0], lambda *a: None, baseline)
    fo.client = Client(n)
    return fo, now


def _first_move(fo, now, bo):
    """Seconds from the loss of the connection to the failover, attempts failing."""
    now[0] = bo.first_delay()
    while True:
        i = fo.failed()
        if i is not None:
            return now[0], i
        now[0] += bo.next_delay(now[0])  # as the client calls it: time offline


def test_a_five_minute_broker_restart_never_moves_a_device():
    fo, now = _policy(_defaults())
    t, i = _first_move(fo, now, Backoff(Low()))  # the default backoff, fastest retries
    assert t > 300 and i == 1


def test_the_attempt_count_moves_a_device_first_when_retries_are_quick():
    cfg = _defaults()
    cfg["after_attempts"] = 3
    fo, now = _policy(cfg)
    bo = Backoff(Low(), base=0.1, cap=1.0, first_window=0.1)
    t, i = _first_move(fo, now, bo)
    assert i == 1 and t < 1


def test_after_s_moves_a_device_that_retries_slowly():
    cfg = _defaults()
    cfg["after_s"] = 100.0
    fo, now = _policy(cfg)
    t, i = _first_move(fo, now, Backoff(Low()))
    assert i == 1 and 100 <= t < 200


def test_the_streak_restarts_after_a_connection_or_a_network_outage():
    cfg = _defaults()
    cfg["after_attempts"] = 2
    fo, now = _policy(cfg)
    assert fo.failed() is None
    fo.connected()
    assert fo.failed() is None
    fo.link_waited()
    assert fo.failed() is None
    assert fo.failed() == 1


def test_the_last_endpoint_wraps_to_the_primary_and_one_broker_never_moves():
    cfg = _defaults()
    cfg["after_attempts"] = 1
    fo, now = _policy(cfg, n=3)
    fo.client.ep = 2
    assert fo.failed() == 0
    fo, now = _policy(cfg, n=1)
    assert fo.failed() is None


def test_a_fail_back_whose_connect_fails_returns_at_once():
    # The primary passed the TCP probe but its MQTT connect failed (a load balancer in
    # front of a dead broker): back to where the device came from, not after after_s.
    fo, now = _policy(_defaults())
    fo.client.ep = 1
    fo._trial = 1  # what run() notes before it moves back
    fo.client.ep = 0
    assert fo.failed() == 1
    assert fo.failed() is None  # once only: then the usual counting
    fo._trial = 1
    fo.connected()  # the primary works: nothing to go back to
    assert fo.failed() is None


def test_baseline_moves_after_every_failed_attempt():
    fo, now = _policy(_defaults(), baseline=True)
    assert fo.failed() == 1 and fo.window_s == 0


def _cfg(broker, **over):
    doc = {"device_id": "d", "broker": broker}
    doc.update(over)
    return validate(doc)


def test_broker_list_inherits_credentials_and_tls_from_the_first():
    tls = {"ca": "/ca.pem", "server_hostname": "a.example"}
    c = _cfg([{"host": "a", "port": 8883, "user": "u", "password": "p", "tls": tls,
               "keepalive": 30}, {"host": "b"}, {"host": "c", "port": 1883, "tls": None}])
    eps = c["broker"]["endpoints"]
    assert [e["host"] for e in eps] == ["a", "b", "c"]
    assert eps[1]["port"] == 8883 and eps[1]["user"] == "u" and eps[1]["tls"]["ca"] == "/ca.pem"
    # The first's name is not the second's: b is verified against its own host.
    assert eps[0]["tls"]["server_hostname"] == "a.example"
    assert eps[1]["tls"]["server_hostname"] is None
    assert "tls" not in eps[2] and eps[2]["port"] == 1883
    assert c["broker"]["host"] == "a" and c["broker"]["keepalive"] == 30
    assert c["failover"] == _defaults()


def test_a_single_broker_object_stays_valid():
    c = _cfg({"host": "a"})
    assert c["broker"]["endpoints"] == [{"host": "a", "port": 1883, "user": None,
                                         "password": None, "protocol": "auto"}]


def test_bad_broker_lists_are_refused_with_the_field_named():
    for broker, words in (([], "list of 1..4"), ([{"host": "a"}] * 5, "list of 1..4"),
                          ([{"host": "a"}, "b"], "list of 1..4"),
                          ([{"host": "a"}, {"port": 1}], "broker[1].host"),
                          ([{"host": "a"}, {"host": "b", "keepalive": 5}],
                           "broker[1].keepalive: session settings"),
                          ([{"host": "a"}, {"host": "b", "tls": {}}], "broker[1].tls.ca")):
        try:
            _cfg(broker)
        except ValueError as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError("accepted %r" % (broker,))
    try:
        _cfg({"host": "a"}, failover={"after_attempts": 0})
    except ValueError as e:
        assert "after_attempts" in str(e)
    else:
        raise AssertionError("accepted after_attempts 0")
