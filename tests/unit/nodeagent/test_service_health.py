"""kube-proxy's health replies as the agent gives them (``ciliary.nodeagent.service_health``, pure)."""

from __future__ import annotations

from ciliary.nodeagent.service_health import ProxyHealth, health_check_reply, proxy_health_reply
from ciliary.operator.services.intent import HealthCheckIntent

HEALTHY = ProxyHealth(healthy=True, last_updated=1_700_000_000.0)
STALE = ProxyHealth(healthy=False, last_updated=1_700_000_000.0)


def test_health_check_is_200_with_local_endpoints_and_a_healthy_proxy() -> None:
    check = HealthCheckIntent(service="shop/web", port=32000, local_endpoints=2)
    assert health_check_reply(check, HEALTHY) == (200, {
        "service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": True})


def test_health_check_is_503_without_local_endpoints_or_when_the_maps_lag() -> None:
    none_here = HealthCheckIntent(service="shop/web", port=32000, local_endpoints=0)
    assert health_check_reply(none_here, HEALTHY)[0] == 503
    here = HealthCheckIntent(service="shop/web", port=32000, local_endpoints=1)
    status, body = health_check_reply(here, STALE)
    assert status == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1


def test_proxy_healthz_reports_times_and_eligibility() -> None:
    status, body = proxy_health_reply(HEALTHY, 1_700_000_005.0)
    assert status == 200
    assert body == {"lastUpdated": "2023-11-14T22:13:20Z", "currentTime": "2023-11-14T22:13:25Z",
                    "nodeEligible": True}
    status, body = proxy_health_reply(ProxyHealth(healthy=False, last_updated=None), 1_700_000_005.0)
    assert status == 503 and body["lastUpdated"] == "" and body["nodeEligible"] is False
