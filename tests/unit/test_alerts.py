"""Alert webhooks: the token check, the payloads Alertmanager and Grafana send, the filter, the
drift event's extra, the body cap, the rate limit and the de-duplication. No Airflow: the plugin's HTTP side is tested in
tests/integration/test_alert_endpoint.py against a running API server."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop import layout
from tuneloop.alert_dedup import (
    DEDUP_KEEP_GENERATIONS,
    AlertDedup,
    AlertDedupError,
    dedup_key,
    duplicate_reason,
)
from tuneloop.alerts import (
    EXTRA_MAX_BYTES,
    MAX_BODY_BYTES,
    Alert,
    AlertFilter,
    AlertPayloadError,
    AuthOutcome,
    RateLimiter,
    check_bearer,
    configured_token,
    decide,
    drift_event_extra,
    notification_from_payload,
    parse_notification,
    read_body,
    retry_after,
    webhook_settings,
)
from tuneloop.config import ConfigError
from tuneloop.storage import LocalStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.unit


def alertmanager_payload(*statuses: str, **labels: str) -> dict[str, Any]:
    """What Alertmanager's webhook receiver posts (version 4), one alert per status."""
    alerts = [
        {
            "status": status,
            "labels": {"alertname": "TuneloopTrafficDrift", "severity": "page", **labels, "instance": f"vllm-{i}"},
            "annotations": {"summary": f"traffic drifted on vllm-{i}", "runbook_url": "https://runbooks/drift"},
            "startsAt": "2026-11-02T09:51:03.157Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=drift",
            "fingerprint": f"fp{i:014x}",
        }
        for i, status in enumerate(statuses or ("firing",))
    ]
    return {
        "version": "4",
        "groupKey": '{}:{alertname="TuneloopTrafficDrift"}',
        "truncatedAlerts": 0,
        "status": "firing" if "firing" in (statuses or ("firing",)) else "resolved",
        "receiver": "tuneloop-refresh",
        "groupLabels": {"alertname": "TuneloopTrafficDrift"},
        "commonLabels": {"alertname": "TuneloopTrafficDrift", "severity": "page"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    }


def grafana_payload(status: str = "firing") -> dict[str, Any]:
    """What a Grafana unified-alerting webhook contact point posts."""
    return {
        "receiver": "tuneloop",
        "status": status,
        "orgId": 1,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "Answer quality dropped", "grafana_folder": "ML", "tuneloop": "drift"},
                "annotations": {"summary": "field accuracy below 0.8 for 1h"},
                "startsAt": "2026-11-02T09:51:03.157076+02:00",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "https://grafana/alerting/grafana/abc/view",
                "fingerprint": "c6eadffa33fcdf37",
                "silenceURL": "https://grafana/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 0.74, "C": 1},
                "valueString": "[ var='B' labels={} value=0.74 ]",
            }
        ],
        "groupLabels": {"alertname": "Answer quality dropped"},
        "commonLabels": {"alertname": "Answer quality dropped", "tuneloop": "drift"},
        "commonAnnotations": {},
        "externalURL": "https://grafana/",
        "version": "1",
        "groupKey": '{}/{tuneloop="drift"}:{alertname="Answer quality dropped"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1] Answer quality dropped ML",
        "state": "alerting",
        "message": "**Firing**\n\nValue: B=0.74",
    }


# --- token ---------------------------------------------------------------------------------


def test_token_from_env_wins_over_the_variable_and_blank_is_not_configured() -> None:
    looked_up: list[bool] = []

    def variable() -> str:
        looked_up.append(True)
        return "from-variable"

    assert configured_token({"TUNELOOP_ALERT_TOKEN": " s3cret "}, variable) == "s3cret"
    assert looked_up == []
    assert configured_token({}, variable) == "from-variable"
    assert configured_token({"TUNELOOP_ALERT_TOKEN": "  "}, lambda: None) is None
    assert configured_token({}, lambda: "") is None
    assert configured_token({}) is None


@pytest.mark.parametrize(
    ("header", "expected", "outcome"),
    [
        ("Bearer s3cret", "s3cret", AuthOutcome.OK),
        ("bearer   s3cret  ", "s3cret", AuthOutcome.OK),
        ("Bearer s3cret", None, AuthOutcome.NOT_CONFIGURED),
        (None, None, AuthOutcome.NOT_CONFIGURED),
        (None, "s3cret", AuthOutcome.MISSING),
        ("", "s3cret", AuthOutcome.MISSING),
        ("Bearer", "s3cret", AuthOutcome.MISSING),
        ("Basic dXNlcjpzM2NyZXQ=", "s3cret", AuthOutcome.MISSING),
        ("s3cret", "s3cret", AuthOutcome.MISSING),
        ("Bearer s3cre", "s3cret", AuthOutcome.INVALID),
        ("Bearer s3cret2", "s3cret", AuthOutcome.INVALID),
        ("Bearer sécret", "s3cret", AuthOutcome.INVALID),
    ],
)
def test_check_bearer(header: str | None, expected: str | None, outcome: AuthOutcome) -> None:
    assert check_bearer(header, expected) is outcome


def test_auth_outcomes_are_distinct_and_map_to_http_statuses() -> None:
    assert len(set(AuthOutcome)) == 4
    assert AuthOutcome.NOT_CONFIGURED.status_code == 503
    assert AuthOutcome.MISSING.status_code == AuthOutcome.INVALID.status_code == 401
    assert check_bearer("Bearer wrong", "s3cret") is not AuthOutcome.MISSING


# --- payloads ------------------------------------------------------------------------------


def test_alertmanager_payload_is_read() -> None:
    notification = parse_notification(json.dumps(alertmanager_payload("firing", "resolved")).encode())
    assert notification.source == "alertmanager"
    assert notification.status == "firing"
    assert notification.receiver == "tuneloop-refresh"
    assert notification.external_url == "http://alertmanager:9093"
    assert [a.status for a in notification.alerts] == ["firing", "resolved"]
    assert [a.fingerprint for a in notification.firing] == ["fp00000000000000"]
    assert notification.alerts[0].name == "TuneloopTrafficDrift"
    assert notification.alerts[0].annotations["summary"] == "traffic drifted on vllm-0"


def test_grafana_payload_is_read() -> None:
    notification = parse_notification(json.dumps(grafana_payload()))
    assert notification.source == "grafana"
    assert notification.title == "[FIRING:1] Answer quality dropped ML"
    assert notification.alerts[0].name == "Answer quality dropped"
    assert notification.alerts[0].fingerprint == "c6eadffa33fcdf37"


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"", 400, "body is empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 422, "must be a JSON object, got a list"),
        (b'"firing"', 422, "must be a JSON object, got a string"),
        (b'{"status": "firing"}', 422, "no 'version' and no 'orgId'"),
        (b'{"version": "3", "alerts": []}', 422, "unsupported Alertmanager webhook version '3'"),
        (b'{"version": "4"}', 422, "no 'alerts' list"),
        (b'{"orgId": 1, "state": "alerting", "evalMatches": []}', 422, "legacy Grafana"),
        (b'{"version": "4", "alerts": {}}', 422, "'alerts' must be a list, got an object"),
        (b'{"version": "4", "alerts": []}', 422, "'alerts' is empty"),
        (b'{"version": "4", "alerts": [1]}', 422, "alerts[0] must be an object, got a number"),
        (b'{"version": "4", "alerts": [{"status": "pending", "labels": {}}]}', 422, "alerts[0].status must be one of ['firing', 'resolved'], got 'pending'"),
        (b'{"version": "4", "alerts": [{"status": "firing"}]}', 422, "alerts[0] has no 'labels'"),
        (b'{"version": "4", "alerts": [{"status": "firing", "labels": ["a"]}]}', 422, "alerts[0].labels must be an object, got a list"),
        (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"a": {"b": 1}}}]}', 422, "alerts[0].labels.a must be a string"),
        (b'{"version": "4", "status": "ok", "alerts": [{"status": "firing", "labels": {}}]}', 422, "'status' must be one of"),
    ],
)
def test_bad_payloads_name_the_reason(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(AlertPayloadError) as caught:
        parse_notification(body)
    assert caught.value.status_code == status
    assert reason in caught.value.reason


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(AlertPayloadError) as caught:
        parse_notification(b" " * (MAX_BODY_BYTES + 1))
    assert caught.value.status_code == 413


def test_scalar_labels_are_kept_as_strings() -> None:
    payload = alertmanager_payload()
    payload["alerts"][0]["labels"].update({"replicas": 3, "canary": True, "empty": None})
    labels = notification_from_payload(payload).alerts[0].labels
    assert (labels["replicas"], labels["canary"], labels["empty"]) == ("3", "True", "")


# --- decision and filter -------------------------------------------------------------------


def test_only_firing_alerts_record_an_event() -> None:
    resolved = decide(notification_from_payload(alertmanager_payload("resolved", "resolved")))
    assert resolved.record is False
    assert "no firing alert (2 resolved)" in resolved.reason
    mixed = decide(notification_from_payload(alertmanager_payload("resolved", "firing")))
    assert mixed.record is True
    assert [a.fingerprint for a in mixed.alerts] == ["fp00000000000001"]


def test_filter_from_env() -> None:
    alert_filter = AlertFilter.from_env({"TUNELOOP_ALERT_MATCH": "tuneloop=drift, team = ml", "TUNELOOP_ALERT_NAMES": "A, B,"})
    assert alert_filter.labels == {"tuneloop": "drift", "team": "ml"}
    assert alert_filter.names == {"A", "B"}
    assert AlertFilter.from_env({}) == AlertFilter()
    with pytest.raises(ValueError, match="key=value"):
        AlertFilter.from_env({"TUNELOOP_ALERT_MATCH": "tuneloop"})


def test_filter_keeps_only_matching_firing_alerts() -> None:
    payload = alertmanager_payload("firing", "firing")
    payload["alerts"][1]["labels"]["tuneloop"] = "drift"
    notification = notification_from_payload(payload)

    by_label = decide(notification, AlertFilter(labels={"tuneloop": "drift"}))
    assert by_label.record and [a.fingerprint for a in by_label.alerts] == ["fp00000000000001"]

    by_name = decide(notification, AlertFilter(names=frozenset({"Other"})))
    assert by_name.record is False
    assert "none of the 2 firing alert(s) (TuneloopTrafficDrift)" in by_name.reason
    assert "alertname in Other" in by_name.reason

    assert decide(notification_from_payload(grafana_payload()), AlertFilter(labels={"tuneloop": "drift"})).record


# --- the event's extra ---------------------------------------------------------------------


def test_extra_carries_source_names_fingerprints_and_receiver() -> None:
    notification = notification_from_payload(alertmanager_payload("firing", "resolved", "firing"))
    decision = decide(notification)
    extra = drift_event_extra(notification, decision.alerts)
    assert extra["source"] == "alertmanager"
    assert extra["alertnames"] == ["TuneloopTrafficDrift"]
    assert extra["fingerprints"] == ["fp00000000000000", "fp00000000000002"]
    assert extra["receiver"] == "tuneloop-refresh"
    assert extra["external_url"] == "http://alertmanager:9093"
    assert extra["firing"] == 2 and extra["alerts_detailed"] == 2
    assert extra["alerts"][1]["labels"]["instance"] == "vllm-2"
    assert extra["alerts"][0]["annotations"]["summary"] == "traffic drifted on vllm-0"
    json.dumps(extra)  # an asset event's extra must be JSON

    grafana = notification_from_payload(grafana_payload())
    grafana_extra = drift_event_extra(grafana, decide(grafana).alerts)
    assert grafana_extra["source"] == "grafana"
    assert grafana_extra["title"] == "[FIRING:1] Answer quality dropped ML"


def test_extra_is_bounded_for_huge_notifications() -> None:
    payload = alertmanager_payload()
    template = payload["alerts"][0]
    payload["alerts"] = []
    for i in range(500):
        alert = copy.deepcopy(template)
        alert["fingerprint"] = f"{i:016x}"
        alert["labels"] = {"alertname": f"Drift{i}", **{f"label{k}": "x" * 1000 for k in range(40)}}
        alert["annotations"] = {"description": "y" * 100_000}
        payload["alerts"].append(alert)
    notification = notification_from_payload(payload)
    extra = drift_event_extra(notification, decide(notification).alerts)
    assert len(json.dumps(extra, ensure_ascii=False).encode()) <= EXTRA_MAX_BYTES
    assert extra["firing"] == 500
    assert extra["alertnames"][0] == "Drift0" and extra["fingerprints"][0] == "0000000000000000"
    assert extra["alerts_detailed"] == len(extra["alerts"]) < 10
    for detail in extra["alerts"]:
        assert len(detail["labels"]) <= 16
        assert all(len(value) <= 256 for value in detail["labels"].values())


# --- the body cap: read incrementally -------------------------------------------------------


class Chunks:
    """A request body arriving in chunks, endless unless ``total`` is given; counts what was read."""

    def __init__(self, size: int = 64 * 1024, total: int | None = None) -> None:
        self.size, self.total, self.read = size, total, 0

    async def stream(self) -> AsyncIterator[bytes]:
        while self.total is None or self.read < self.total:
            chunk = b"x" * (self.size if self.total is None else min(self.size, self.total - self.read))
            self.read += len(chunk)
            yield chunk


def test_an_endless_chunked_body_is_refused_at_the_chunk_that_passes_the_cap() -> None:
    body = Chunks()
    with pytest.raises(AlertPayloadError) as caught:
        asyncio.run(read_body(body.stream()))
    assert caught.value.status_code == 413
    assert f"passed the limit of {MAX_BODY_BYTES} bytes" in caught.value.reason
    assert MAX_BODY_BYTES < body.read <= MAX_BODY_BYTES + body.size  # one chunk past the cap, no further


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    body = Chunks(total=10)
    with pytest.raises(AlertPayloadError) as caught:
        asyncio.run(read_body(body.stream(), declared_length=str(MAX_BODY_BYTES + 1)))
    assert caught.value.status_code == 413 and body.read == 0


def test_a_body_up_to_the_cap_is_read_whole() -> None:
    assert asyncio.run(read_body(Chunks(size=1000, total=4096).stream(), limit=4096)) == b"x" * 4096
    with pytest.raises(AlertPayloadError):
        asyncio.run(read_body(Chunks(size=1000, total=4097).stream(), limit=4096))


# --- the rate limit -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_lets_a_burst_through_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)
    assert [limiter.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire() == pytest.approx(10.0)  # 6 a minute: the next token in 10 s
    clock.now += 4
    assert limiter.acquire() == pytest.approx(6.0)  # a refused call took nothing
    clock.now += 6
    assert limiter.acquire() == 0.0
    assert limiter.acquire() > 0
    clock.now += 3600  # a long quiet spell refills the burst, not more
    assert [limiter.acquire() == 0.0 for _ in range(4)] == [True, True, True, False]


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after(0.01), retry_after(1.0), retry_after(9.2)] == ["1", "1", "10"]
    with pytest.raises(ValueError, match="per_minute > 0"):
        RateLimiter(per_minute=0, burst=1)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"TUNELOOP__ALERTS__RATE_LIMIT_PER_MINUTE": "0"}, "alerts.rate_limit_per_minute = 0"),
        ({"TUNELOOP__ALERTS__RATE_LIMIT_BURST": "0"}, "alerts.rate_limit_burst = 0"),
        ({"TUNELOOP__ALERTS__DEDUP_WINDOW_HOURS": "-1"}, "alerts.dedup_window_hours = -1"),
        ({"TUNELOOP__ALERTS__DEDUP_WINDOW": "4"}, "alerts.dedup_window = 4: unknown key"),
    ],
)
def test_bad_alert_settings_name_the_key(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        webhook_settings(env)


def test_alert_settings_have_bounded_defaults_and_take_overrides() -> None:
    defaults = webhook_settings({}).alerts
    assert defaults.rate_limit_per_minute == 30 and defaults.rate_limit_burst == 10
    assert defaults.dedup_window_hours == 24  # above Alertmanager's default repeat_interval (4h)
    chosen = webhook_settings({"TUNELOOP__ALERTS__RATE_LIMIT_BURST": "2", "TUNELOOP__ALERTS__DEDUP_WINDOW_HOURS": "0"}).alerts
    assert (chosen.rate_limit_burst, chosen.dedup_window_hours) == (2, 0)


# --- de-duplication -------------------------------------------------------------------------

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
DAY_S = 24 * 3600


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def firing(fingerprint: str | None = "a1b2c3d4e5f60718", **labels: str) -> Alert:
    return Alert("firing", {"alertname": "TuneloopTrafficDrift", **labels}, {}, fingerprint=fingerprint)


def test_a_resent_alert_is_a_duplicate_of_the_refresh_it_triggered(tmp_path: Path) -> None:
    clock = WallClock()
    dedup = AlertDedup(LocalStore(tmp_path), DAY_S, now=clock)
    first = dedup.claim([firing()], source="alertmanager")
    assert first.new == (firing(),) and first.duplicates == () and first.claim
    dedup.attach_event(first.claim, 7)

    clock.now += timedelta(hours=4)  # Alertmanager's default repeat_interval
    resent = dedup.claim([firing()], source="alertmanager")
    assert resent.new == () and resent.claim is None
    [(alert, entry)] = resent.duplicates
    assert alert == firing()
    assert entry["asset_event_id"] == 7 and entry["key"] == "fingerprint:a1b2c3d4e5f60718"
    assert entry["claimed_at"] == T0.isoformat() and entry["expires_at"] == (T0 + timedelta(days=1)).isoformat()
    assert duplicate_reason(resent.duplicates, DAY_S) == (
        "duplicate: 1 firing alert(s) already triggered a refresh in the last 24 h (alerts.dedup_window_hours); joined asset event 7"
    )


def test_the_state_is_shared_through_the_store_not_the_process(tmp_path: Path) -> None:
    """Two API-server workers each make their own AlertDedup on the same store."""
    clock = WallClock()
    worker_a, worker_b = AlertDedup(LocalStore(tmp_path), DAY_S, now=clock), AlertDedup(LocalStore(tmp_path), DAY_S, now=clock)
    assert worker_a.claim([firing()], source="grafana").new
    assert not worker_b.claim([firing()], source="grafana").new
    assert worker_b.claim([firing("0000000000000002")], source="grafana").new  # another alert
    assert LocalStore(tmp_path).list(layout.ALERT_DEDUP) == [layout.alert_dedup(1), layout.alert_dedup(2)]


def test_without_a_fingerprint_the_labels_identify_the_alert(tmp_path: Path) -> None:
    dedup = AlertDedup(LocalStore(tmp_path), DAY_S, now=WallClock())
    one = Alert("firing", {"alertname": "Drift", "team": "ml"}, {"summary": "first"})
    same_labels_other_order = Alert("firing", {"team": "ml", "alertname": "Drift"}, {"summary": "resent"})
    other = Alert("firing", {"alertname": "Drift", "team": "search"}, {})
    assert dedup_key(one) == dedup_key(same_labels_other_order) != dedup_key(other)
    assert dedup_key(one).startswith("labels:")
    assert dedup.claim([one], source="alertmanager").new == (one,)
    assert dedup.claim([same_labels_other_order], source="alertmanager").new == ()
    assert dedup.claim([other], source="alertmanager").new == (other,)


def test_a_call_with_seen_and_new_alerts_claims_only_the_new_ones_once(tmp_path: Path) -> None:
    dedup = AlertDedup(LocalStore(tmp_path), DAY_S, now=WallClock())
    dedup.claim([firing("seen")], source="alertmanager")
    result = dedup.claim([firing("seen"), firing("new"), firing("new")], source="alertmanager")
    assert [a.fingerprint for a in result.new] == ["new"]
    assert [a.fingerprint for a, _ in result.duplicates] == ["seen"]


def test_after_the_window_the_alert_triggers_again_and_expired_entries_are_dropped(tmp_path: Path) -> None:
    clock = WallClock()
    store = LocalStore(tmp_path)
    dedup = AlertDedup(store, DAY_S, now=clock)
    dedup.claim([firing("old")], source="alertmanager")
    clock.now += timedelta(days=1, seconds=1)
    assert dedup.claim([firing("old")], source="alertmanager").new
    clock.now += timedelta(hours=1)
    dedup.claim([firing("other")], source="alertmanager")
    newest = store.list(layout.ALERT_DEDUP)[-1]
    assert sorted(store.get_json(newest)["entries"]) == ["fingerprint:old", "fingerprint:other"]
    clock.now += timedelta(days=2)
    dedup.claim([firing("third")], source="alertmanager")
    assert sorted(store.get_json(store.list(layout.ALERT_DEDUP)[-1])["entries"]) == ["fingerprint:third"]


def test_a_released_claim_lets_the_next_resend_try_again(tmp_path: Path) -> None:
    """The event could not be recorded (503): the alert must not be muted for a day."""
    dedup = AlertDedup(LocalStore(tmp_path), DAY_S, now=WallClock())
    claim = dedup.claim([firing()], source="alertmanager").claim
    assert claim is not None
    dedup.release(claim)
    assert dedup.claim([firing()], source="alertmanager").new


def test_concurrent_workers_claim_one_alert_once(tmp_path: Path) -> None:
    results: list[int] = []
    start = threading.Barrier(6)

    def worker() -> None:
        dedup = AlertDedup(LocalStore(tmp_path), DAY_S)
        start.wait()
        results.append(len(dedup.claim([firing()], source="alertmanager").new))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 0, 0, 0, 0, 1]


def test_old_generations_are_pruned_and_entries_bounded(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    dedup = AlertDedup(store, DAY_S, now=WallClock(), max_entries=5)
    for i in range(20):
        dedup.claim([firing(f"fp{i:02d}")], source="alertmanager")
    kept = store.list(layout.ALERT_DEDUP)
    assert kept[-1] == layout.alert_dedup(20) and len(kept) <= DEDUP_KEEP_GENERATIONS
    assert len(store.get_json(kept[-1])["entries"]) == 5


def test_window_zero_turns_it_off_and_writes_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    dedup = AlertDedup(store, 0)
    assert dedup.claim([firing()], source="alertmanager").new
    assert dedup.claim([firing()], source="alertmanager").new
    assert store.list("") == []


def test_a_state_that_keeps_changing_underneath_is_an_error_naming_the_store(tmp_path: Path) -> None:
    class LosingStore(LocalStore):
        def put_if_absent(self, key: str, data: bytes) -> bool:
            return False

    with pytest.raises(AlertDedupError, match=f"state in file://{tmp_path} changed under 8 attempts"):
        AlertDedup(LosingStore(tmp_path), DAY_S).claim([firing()], source="alertmanager")


def test_the_loop_label_routes_an_alert_to_its_loop() -> None:
    """With a loops folder, `tuneloop_loop` names the loop whose drift asset gets the event."""
    from tuneloop.alerts import Alert, AlertPayloadError, loop_of

    def alert(**labels: str) -> Alert:
        return Alert(status="firing", labels={"alertname": "Drift", **labels}, annotations={}, starts_at=None, fingerprint=None)

    assert loop_of([alert()], several_loops=False) is None
    assert loop_of([alert(tuneloop_loop="invoices"), alert(tuneloop_loop="invoices")], several_loops=True) == "invoices"
    with pytest.raises(AlertPayloadError, match="label the alert with tuneloop_loop"):
        loop_of([alert()], several_loops=True)
    with pytest.raises(AlertPayloadError, match="several loops"):
        loop_of([alert(tuneloop_loop="invoices"), alert(tuneloop_loop="tickets")], several_loops=True)
    with pytest.raises(AlertPayloadError, match="no loop id"):
        loop_of([alert(tuneloop_loop="../etc")], several_loops=True)
