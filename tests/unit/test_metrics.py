"""The loop's Prometheus metrics (tuneloop/metrics.py) read back with prometheus_client's own
parser: names, labels (escaped), values, one family per name."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.config import load_settings
from tuneloop.metrics import loop_down, loop_metrics, metrics_from_status, render
from tuneloop.registry import Registry
from tuneloop.storage import LocalStore

pytestmark = pytest.mark.unit

STATUS = {
    "aliases": {"production": "v2", "previous": "v1", "candidate": None},
    "versions": ["v1", "v2"],
    "drift": {
        "as_of": "2026-03-04", "checked_at": "2026-12-07T12:22:51+00:00", "drift": True, "emit": True, "streak": 1,
        "p_value": 3.3e-85, "statistic": 0.8108, "method": "classifier",
        "performance": {"checked": True, "delta": -0.165, "p_value": 2.2e-22},
    },
    "snapshot": {"counts": {"total": 1452, "accepted": 1393, "train": 1115, "eval": 278, "quarantined": 59},
                 "reasons": {"near_duplicate": 31, 'gx:values_to_match_regex:"labelled_at"\\x\n': 2}},
    "newest_version": {"version": "v2", "metrics": {"train": {"tokens_per_second": 6156.0, "final_loss": 0.8957, "seconds": 111.78, "device": "cpu"}}},
    "gate": {"version": "v2", "promote": True, "slices": {
        "drifted": {"delta": 0.1674, "ci_low": 0.1667, "ci_high": 0.1689, "rule": "improve", "passed": True},
        "original": {"delta": 0.0109, "ci_low": 0.0062, "ci_high": 0.0163, "rule": "non_inferior", "passed": True},
    }},
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    names = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert len(names) == len(set(names))  # one family per name
    return found


def test_the_loops_state_parses_with_prometheus_clients_parser_and_carries_the_loop_id() -> None:
    text = render([*metrics_from_status("invoices", STATUS), *metrics_from_status("tickets", {"aliases": {"production": None}})])
    samples = _samples(text)
    assert samples[("tuneloop_drift_p_value", (("loop", "invoices"), ("method", "classifier")))] == 3.3e-85
    assert samples[("tuneloop_drift_detected", (("loop", "invoices"),))] == 1.0
    assert samples[("tuneloop_drift_score_delta", (("loop", "invoices"),))] == -0.165
    assert samples[("tuneloop_alias_version", (("alias", "production"), ("loop", "invoices")))] == 2.0
    assert samples[("tuneloop_production_info", (("loop", "invoices"), ("version", "v2")))] == 1.0
    assert samples[("tuneloop_intake_rows", (("loop", "invoices"), ("outcome", "quarantined")))] == 59
    # a reason with a quote, a backslash and a newline survives the escaping
    assert samples[("tuneloop_intake_quarantined_rows", (("loop", "invoices"), ("reason", 'gx:values_to_match_regex:"labelled_at"\\x\n')))] == 2
    assert samples[("tuneloop_gate_delta_ci_low", (("loop", "invoices"), ("rule", "improve"), ("slice", "drifted"), ("version", "v2")))] == 0.1667
    assert samples[("tuneloop_train_tokens_per_second", (("device", "cpu"), ("loop", "invoices"), ("version", "v2")))] == 6156.0
    # the second loop: up, nothing else known yet, nothing made up
    tickets = {key: value for key, value in samples.items() if ("loop", "tickets") in key[1]}
    assert tickets == {("tuneloop_loop_up", (("loop", "tickets"),)): 1.0, ("tuneloop_versions", (("loop", "tickets"),)): 0.0}


def test_metrics_of_a_real_store_and_of_an_unreadable_one(tmp_path: Path) -> None:
    settings = load_settings(env={"TUNELOOP__STORE__URI": str(tmp_path / "store")})
    store = LocalStore(tmp_path / "store")
    registry = Registry(store)
    registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    registry.move_aliases({"production": "v1"}, reason="test")
    samples = _samples(render(loop_metrics("loop", settings, store)))
    assert samples[("tuneloop_production_info", (("loop", "loop"), ("version", "v1")))] == 1.0
    assert samples[("tuneloop_versions", (("loop", "loop"),))] == 1.0
    down = _samples(render(loop_down("other")))
    assert down == {("tuneloop_loop_up", (("loop", "other"),)): 0.0}


def test_a_bad_metric_name_is_refused() -> None:
    from tuneloop.metrics import Metric

    with pytest.raises(ValueError, match="invalid metric name"):
        render([Metric("tuneloop drift", "x")])


