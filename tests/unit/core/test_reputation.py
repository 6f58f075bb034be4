"""Sender reputation decisions (core/reputation.py): pool assignment, blocklist answers,
state changes and failover choice. Pure: no DNS, no Postfix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relay_milter.config import BlocklistZone, ConfigError, ReputationSettings, Settings, SmarthostRate, TenantLimits
from relay_milter.core import reputation as rep
from relay_milter.reputation.state import load_state, save_state
from support.factories import tenant


def pool(**kw) -> ReputationSettings:
    return ReputationSettings.model_validate({
        "pool": [
            {"address": "127.0.0.2", "helo": "out-a.relay.test", "tenants": ["acme"]},
            {"address": "127.0.0.3", "helo": "out-b.relay.test"},
            {"address": "127.0.0.4", "helo": "out-c.relay.test", "role": "standby"},
            {"address": "127.0.0.5", "helo": "out-d.relay.test", "role": "standby"},
            {"address": "2001:db8::25", "helo": "out6.relay.test", "role": "standby"},
        ],
        **kw,
    })


ACME, GLOBEX, INITECH = tenant("acme"), tenant("globex", source_address="127.0.0.3"), tenant("initech")


def test_assignment_from_either_side_and_default():
    got = rep.assignments([ACME, GLOBEX, INITECH], pool(), rep.empty_state())
    assert got["acme"].address == "127.0.0.2" and got["acme"].helo == "out-a.relay.test"
    assert got["globex"].address == "127.0.0.3"
    assert got["initech"] is None


def test_pool_mismatches_name_the_tenant_and_field():
    with pytest.raises(ConfigError, match=r"tenant globex: field source_address: 127.0.0.9 is not in"):
        rep.assignments([tenant("globex", source_address="127.0.0.9")], pool(), rep.empty_state())
    with pytest.raises(ConfigError, match=r"tenant acme: field source_address: 127.0.0.3, but reputation.pool dedicates 127.0.0.2"):
        rep.assignments([tenant("acme", source_address="127.0.0.3")], pool(), rep.empty_state())
    with pytest.raises(ConfigError, match=r"dedicated to tenant acme, which does not exist"):
        rep.assignments([GLOBEX], pool(), rep.empty_state())


def test_pool_validation():
    with pytest.raises(ValidationError, match="listed twice"):
        ReputationSettings.model_validate({"pool": [{"address": "127.0.0.2", "helo": "a.test"}, {"address": "127.0.0.2", "helo": "b.test"}]})
    with pytest.raises(ValidationError, match="not an IPv4 or IPv6 address"):
        ReputationSettings.model_validate({"pool": [{"address": "127.0.0.300", "helo": "a.test"}]})
    with pytest.raises(ValidationError, match="dedicated to both"):
        ReputationSettings.model_validate({"pool": [{"address": "127.0.0.2", "helo": "a.test", "tenants": ["x"]}, {"address": "127.0.0.3", "helo": "b.test", "tenants": ["x"]}]})
    with pytest.raises(ValidationError):
        Settings.model_validate({"reputation": {"failover": "sometimes"}})


def test_reversed_names():
    assert rep.reversed_name("127.0.0.2") == "2.0.0.127"
    assert rep.ip_query("192.0.2.99", BlocklistZone(zone="bl.test")) == "99.2.0.192.bl.test."
    six = rep.reversed_name("2001:db8::25")
    assert six == "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


@pytest.mark.parametrize(
    ("answers", "error", "listed", "want"),
    [
        ((), None, (), "clean"),
        (("127.0.0.2",), None, (), "listed"),
        (("127.0.0.2",), None, ("127.0.0.2",), "listed"),
        (("127.0.0.9",), None, ("127.0.0.2",), "error"),  # an unknown code is not a verdict
        (("127.255.255.254",), None, (), "error"),  # public resolver refused
        (("127.255.255.255",), None, (), "error"),  # over quota
        (("10.1.2.3",), None, (), "error"),  # not a blocklist answer
        ((), "Timeout", (), "error"),
    ],
)
def test_classify(answers, error, listed, want):
    zone = BlocklistZone(zone="bl.test", listed=listed)
    assert rep.classify(rep.Answer("bl.test", answers, error), zone)[0] == want


def test_combine_listing_wins_error_keeps_state():
    assert rep.combine([("clean", "a: not listed"), ("listed", "b.test: listed (127.0.0.2)")])[:2] == ("listed", ["b.test"])
    assert rep.combine([("clean", "a"), ("error", "b: refused")])[0] == "error"
    state = rep.empty_state()
    assert rep.record(state, "addresses", "127.0.0.2", "clean", [], "ok", 1.0) is None  # first check: no event
    c = rep.record(state, "addresses", "127.0.0.2", "listed", ["bl.test"], "bl.test: listed", 2.0)
    assert c.event == "IP_LISTED" and c.fields["lists"] == "bl.test"
    assert rep.record(state, "addresses", "127.0.0.2", "error", [], "refused", 3.0) is None
    assert state["addresses"]["127.0.0.2"]["state"] == "listed"  # an error says nothing
    c = rep.record(state, "addresses", "127.0.0.2", "clean", [], "ok", 4.0)
    assert c.event == "IP_DELISTED"
    assert rep.record(state, "domains", "acme.relay.test", "listed", ["dbl.test"], "x", 5.0).event == "DOMAIN_LISTED"


def test_auto_failover_moves_tenants_to_healthy_standby_of_same_version():
    cfg, state = pool(failover="auto"), rep.empty_state()
    rep.record(state, "addresses", "127.0.0.4", "listed", ["bl.test"], "x", 1.0)  # the first standby is listed itself
    rep.record(state, "addresses", "127.0.0.2", "listed", ["bl.test"], "x", 1.0)
    changes, stuck = rep.auto_failovers(state, cfg, [ACME, GLOBEX], 2.0)
    assert [c.event for c in changes] == ["IP_FAILOVER"] and not stuck
    assert changes[0].fields == {"to": "127.0.0.5", "helo": "out-d.relay.test", "tenants": "acme"}
    assert rep.assignments([ACME, GLOBEX], cfg, state)["acme"].address == "127.0.0.5"
    assert rep.assignments([ACME, GLOBEX], cfg, state)["globex"].address == "127.0.0.3"
    # Next: globex's address is listed too; the only healthy IPv4 standby is taken but usable.
    rep.record(state, "addresses", "127.0.0.3", "listed", ["bl.test"], "x", 3.0)
    changes, stuck = rep.auto_failovers(state, cfg, [ACME, GLOBEX], 3.0)
    assert changes[0].fields["to"] == "127.0.0.5" and changes[0].fields["tenants"] == "globex"
    # The standby is listed now: nothing healthy is left for a further failover.
    rep.record(state, "addresses", "127.0.0.5", "listed", ["bl.test"], "x", 4.0)
    with pytest.raises(ValueError, match="no healthy standby IPv4"):
        rep.fail_over(state, cfg, [ACME, GLOBEX], "127.0.0.5", 4.0)


def test_failover_chain_and_restore():
    cfg, state = pool(), rep.empty_state()
    rep.fail_over(state, cfg, [ACME], "127.0.0.2", 1.0)
    assert rep.users_of("127.0.0.4", [ACME], cfg, state) == ["acme"]
    with pytest.raises(ValueError, match="already failed over"):
        rep.fail_over(state, cfg, [ACME], "127.0.0.2", 1.0)
    c = rep.restore(state, "127.0.0.2", 2.0)
    assert c.event == "IP_RESTORED" and rep.assignments([ACME], cfg, state)["acme"].address == "127.0.0.2"
    with pytest.raises(ValueError, match="no failover in force"):
        rep.restore(state, "127.0.0.2", 2.0)


def test_unused_listed_address_does_not_fail_over():
    cfg, state = pool(failover="auto"), rep.empty_state()
    rep.record(state, "addresses", "127.0.0.3", "listed", ["bl.test"], "x", 1.0)  # nobody leaves from it
    assert rep.auto_failovers(state, cfg, [ACME], 1.0) == ([], [])


def test_state_file_round_trip(tmp_path):
    state = rep.empty_state()
    rep.fail_over(state, pool(), [ACME], "127.0.0.2", 1.0)
    rep.log_events(state, [rep.Change("IP_LISTED", "127.0.0.2", "x")], 1.0)
    save_state(tmp_path / "r.json", state)
    assert load_state(tmp_path / "r.json") == state
    assert state["counts"] == {"IP_LISTED": 1}
    assert load_state(tmp_path / "missing.json") == rep.empty_state()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read the reputation state"):
        load_state(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_state(tmp_path / "list.json")


def test_event_counters_outlive_the_kept_events():
    """relay_reputation_events_total is a counter: it keeps counting past MAX_EVENTS."""
    state = rep.empty_state()
    for n in range(rep.MAX_EVENTS + 5):
        rep.log_events(state, [rep.Change("IP_LISTED" if n % 2 else "IP_DELISTED", "127.0.0.2", "x")], float(n))
    assert len(state["events"]) == rep.MAX_EVENTS
    assert state["counts"] == {"IP_LISTED": 102, "IP_DELISTED": 103}
    # A state file written before the counters existed starts them from its events.
    old = {k: v for k, v in state.items() if k != "counts"}
    assert rep.normalise_state(old)["counts"] == {"IP_LISTED": 100, "IP_DELISTED": 100}


@pytest.mark.parametrize(("rate", "delay"), [("1/s", "0s"), ("10/s", "0s"), ("30/m", "2s"), ("7/m", "9s"), ("60/h", "60s")])
def test_rate_delay_never_exceeds_the_rate(rate, delay):
    assert SmarthostRate.model_validate(rate).delay == delay


def test_rate_and_limits_validation():
    with pytest.raises(ValidationError, match="not a rate"):
        tenant("acme", smarthost={"host": "127.0.0.1", "rate": "fast"})
    with pytest.raises(ValidationError):
        TenantLimits.model_validate({"max_queued": 0})
    assert tenant("acme", limits={"max_queued": 3}).limits.max_queued == 3
