"""How the governance bench turns its measurements into results (no platform started)."""

from __future__ import annotations

import pytest

from fleetmesh.bench import BENCHES, governance
from fleetmesh.bench.report import BenchReport, Result
from fleetmesh.registry.api import InstanceIn
from fleetmesh.registry.domain import CheckKind

pytestmark = pytest.mark.unit


def ms(*values: float) -> list[float]:
    return [value / 1000 for value in values]


def measured() -> dict[str, Result]:
    figures = governance.Figures(
        discovery=governance.Discovery(
            http_rate=600.0,
            healthz_rate=800.0,
            http_latencies=ms(*range(1, 101)),
            healthz_latencies=ms(*(value / 2 for value in range(1, 101))),
            cached_picks=[0.000_010] * 98 + [0.000_020] * 2,
            bare_picks=[0.000_002] * 98 + [0.000_004] * 2,
        ),
        watches=governance.Watches(
            registry=ms(*([5.0] * 98 + [9.0] * 2)),
            registry_writes=ms(*([4.0] * 100)),
            config_client=ms(*([12.0] * 98 + [20.0] * 2)),
            live_config=ms(*([8.0] * 98 + [16.0] * 2)),
            config_writes=ms(*([7.0] * 100)),
            raw_kv=ms(*([0.5] * 98 + [1.0] * 2)),
        ),
        health=governance.HealthCost(
            instances=1000,
            interval_s=10.0,
            window_s=30.0,
            idle_cpu_percent=1.0,
            checking_cpu_percent=21.0,
            nats_cpu_percent=0.5,
            probes_answered=3000,
            registrations_per_s=250.0,
            bare_cpu_per_probe_s=0.001,
        ),
    )
    report = BenchReport(governance.NAME)
    governance.fill(report, figures)
    return {result.name: result for result in report.results}


def test_discovery_is_set_against_the_trivial_endpoint_and_the_bare_balancer() -> None:
    results = measured()
    concurrent = results["discovery over HTTP, 16 in flight"]
    assert concurrent.limit_name == "GET /healthz, 16 in flight"
    assert concurrent.ratio == pytest.approx(0.75)
    sequential = results["discovery over HTTP, one at a time, p99"]
    assert sequential.value == pytest.approx(99.0)
    assert sequential.limit_value == pytest.approx(49.5)
    cached = results["cached client pick(), p99"]
    assert (cached.value, cached.unit) == (pytest.approx(20.0), "µs")
    assert cached.limit_value == pytest.approx(4.0)
    assert results["cached client pick(), p50"].ratio == pytest.approx(5.0)


def test_every_watch_latency_is_set_against_the_raw_kv_watch() -> None:
    results = measured()
    registry = results["registry change -> RegistryClient woke, p50"]
    assert (registry.value, registry.unit) == (pytest.approx(5.0), "ms")
    assert registry.limit_name == "raw KV put -> watcher woke, p50"
    assert registry.ratio == pytest.approx(10.0)
    assert results["config PUT -> ConfigClient woke, p99"].value == pytest.approx(20.0)
    assert results["config PUT -> ConfigClient woke, p99"].limit_value == pytest.approx(1.0)
    assert results["config PUT -> LiveConfig woke, p99"].ratio == pytest.approx(16.0)
    assert results["config write call (PUT), p50"].value == pytest.approx(7.0)
    assert results["registry write call (register / deregister), p50"].value == pytest.approx(4.0)


def test_health_checking_cost_is_net_of_idle_and_set_against_bare_probes() -> None:
    results = measured()
    cost = results[
        "health checking 1,000 HTTP-checked instances every 10 s: platform CPU, net of idle"
    ]
    assert cost.value == pytest.approx(20.0)
    assert cost.limit_name == "bare httpx GETs at the same rate"
    assert cost.limit_value == pytest.approx(10.0)  # 1 ms x 100 probes/s
    assert cost.ratio == pytest.approx(2.0)
    probes = results["probes answered"]
    assert (probes.value, probes.limit_value) == (pytest.approx(100.0), pytest.approx(100.0))
    assert results["platform CPU per probe, net of idle"].value == pytest.approx(2.0)
    assert results["platform CPU, idle"].value == pytest.approx(1.0)


def test_cpu_figures() -> None:
    assert governance.cpu_percent(10.0, 13.0, 30.0) == pytest.approx(10.0)
    assert governance.cpu_percent(1.0, 2.0, 0.0) == 0.0
    quieter = governance.HealthCost(idle_cpu_percent=3.0, checking_cpu_percent=2.0)
    assert quieter.net_cpu_percent == 0.0
    assert quieter.probes_per_s == 0.0 and quieter.net_cpu_per_probe_s == 0.0
    assert governance.HealthCost(instances=200, interval_s=10.0).expected_probes_per_s == 20.0


def test_the_cpu_window_spans_whole_check_intervals() -> None:
    assert governance.whole_intervals(quick=False) == 3
    assert governance.whole_intervals(quick=True) == 1


def test_the_registration_bodies_are_what_the_registry_api_accepts() -> None:
    checked = InstanceIn.model_validate(governance.http_check_instance("hc-00001", 40_001))
    check = checked.check.to_domain()
    assert (check.kind, check.interval, check.http_path) == (
        CheckKind.HTTP,
        governance.CHECK_INTERVAL_S,
        governance.HEALTH_PATH,
    )
    assert check.problems() == []
    ttl = InstanceIn.model_validate(governance.ttl_instance("d-1", 20_000)).check.to_domain()
    assert ttl.kind is CheckKind.TTL and ttl.interval == 3600


async def test_wakeups_resolve_the_armed_future_once() -> None:
    wakeups = governance.Wakeups()
    wakeups("before anything was armed")  # ignored
    arrival = wakeups.arm()
    wakeups("changed")
    wakeups("changed again")
    assert arrival.done() and arrival.result() > 0
    assert not wakeups.arm().done()


def test_the_governance_bench_is_registered() -> None:
    assert BENCHES["governance"] is governance.run
