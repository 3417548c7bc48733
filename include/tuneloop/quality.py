"""The data quality gate: a Great Expectations 1.x suite over rows that passed the row checks.

Row-level expectations mark individual rows; every row an expectation rejects is moved to
quarantine with the reason ``gx:<expectation>:<column>``. PII follows ``data.pii``: ``flag`` keeps
the e-mail/phone regex expectation (card numbers too, unless the intake checks ran: they test
card numbers with the Luhn checksum, which a regex cannot), ``redact``/``off`` drop it. Batch thresholds (quarantine rate,
minimum accepted rows) raise :class:`DataQualityError` whose message lists every failing
expectation with its counts, so the task log alone says why a refresh stopped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneloop.validate import CheckedBatch, QuarantinedRow

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.intake_checks import IntakeReport

DOMAINS = ["original", "drifted"]
# The regexes are written so that ``re`` scans fast (it runs them over every prompt); each finds
# a match exactly where its plain form does: e-mail ``[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}``,
# injection ``(?i)(ignore (all |any )?(previous|prior|above) instructions|disregard (the )?(system|previous)
# prompt|you are now)``. The card pattern is the one used when the intake checks (Luhn) did not run.
PII_PATTERNS = {
    "email": r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9.-]+\.[A-Za-z]{2,}",  # starts with "@": re jumps from "@" to "@"
    "card_number": r"\b(?:\d[ -]?){13,16}\b",
    "phone": r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}",
}
INJECTION_PATTERN = (
    r"[IiDdYy](?i:(?<=i)gnore (?:all |any )?(?:previous|prior|above) instructions"
    r"|(?<=d)isregard (?:the )?(?:system|previous) prompt|(?<=y)ou are now)"
)
ISO_TIMESTAMP = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$"


class DataQualityError(RuntimeError):
    """The batch failed its thresholds; the message carries the numbers."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class QualityReport:
    """What the suite found; ``validation_result`` is GX's full result as JSON."""

    total: int
    accepted: int
    quarantined: int
    reasons: dict[str, int]
    expectations: list[dict[str, Any]]
    validation_result: dict[str, Any]
    passed: bool
    failures: list[str]
    checks: dict[str, Any] | None = None  # the intake checks' summary, when they ran

    def summary(self) -> dict[str, Any]:
        summary = {
            "total": self.total,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "reasons": self.reasons,
            "passed": self.passed,
            "failures": self.failures,
            "expectations": self.expectations,
        }
        if self.checks is not None:
            summary["checks"] = self.checks
        return summary


def _build_suite(gx: Any, *, min_prompt_chars: int, max_prompt_chars: int, pii_patterns: list[str]) -> Any:
    suite = gx.ExpectationSuite(name="tuneloop_labelled_rows")
    expect = gx.expectations
    suite.add_expectation(expect.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(expect.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=min_prompt_chars, max_value=max_prompt_chars))
    suite.add_expectation(expect.ExpectColumnValuesToNotBeNull(column="domain"))
    suite.add_expectation(expect.ExpectColumnValuesToBeInSet(column="domain", value_set=DOMAINS, mostly=1.0))
    suite.add_expectation(expect.ExpectColumnValuesToMatchRegex(column="labelled_at", regex=ISO_TIMESTAMP))
    if pii_patterns:
        suite.add_expectation(expect.ExpectColumnValuesToNotMatchRegexList(column="prompt", regex_list=pii_patterns))
    suite.add_expectation(expect.ExpectColumnValuesToNotMatchRegex(column="prompt", regex=INJECTION_PATTERN))
    return suite


def run_quality_gate(
    batch: CheckedBatch,
    *,
    max_quarantine_rate: float,
    min_accepted_rows: int,
    min_prompt_chars: int = 40,
    max_prompt_chars: int = 4000,
    pii: str = "flag",
    intake: IntakeReport | None = None,
    progress: Callable[[str], None] | None = None,
) -> QualityReport:
    """Run the GX suite on ``batch.accepted``, move failing rows to ``batch.quarantined``,
    then apply the batch thresholds (the caller raises :class:`DataQualityError`).

    ``intake`` is the report of :func:`tuneloop.intake_checks.run_intake_checks` when it ran
    on this batch: its summary joins the report and card numbers are left to its Luhn check."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import pandas as pd

    rows = batch.accepted
    frame = pd.DataFrame(
        {
            "_row": range(len(rows)),
            "id": [r["id"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "domain": [r.get("domain") for r in rows],
            "labelled_at": [r.get("labelled_at") or "" for r in rows],
        }
    )
    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    except Exception:  # noqa: BLE001 - cosmetic setting; older/newer GX shapes differ
        pass
    asset = context.data_sources.add_pandas("tuneloop").add_dataframe_asset("labelled_rows")
    batch_definition = asset.add_batch_definition_whole_dataframe("batch")
    pii_patterns = [] if pii != "flag" else [p for kind, p in PII_PATTERNS.items() if intake is None or kind != "card_number"]
    suite = context.suites.add(_build_suite(gx, min_prompt_chars=min_prompt_chars, max_prompt_chars=max_prompt_chars, pii_patterns=pii_patterns))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name="tuneloop_intake", data=batch_definition, suite=suite))
    if progress:
        progress(f"Great Expectations: {len(suite.expectations)} expectations on {len(rows)} rows")
    result = validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]},
    )

    reasons_by_row: dict[int, list[str]] = {}
    expectations: list[dict[str, Any]] = []
    for item in result.results:
        config = item.expectation_config
        assert config is not None, "a GX validation result without its expectation"
        column = config.kwargs.get("column")
        name = f"gx:{config.type.removeprefix('expect_column_')}:{column}"
        unexpected = item.result.get("unexpected_index_list") or []
        expectations.append({"expectation": config.type, "column": column, "success": bool(item.success), "unexpected_count": int(item.result.get("unexpected_count") or 0)})
        for entry in unexpected:
            row = int(entry["_row"] if isinstance(entry, dict) else entry)
            reasons_by_row.setdefault(row, []).append(name)

    kept, kept_origins = [], []
    for index, (record, origin) in enumerate(zip(rows, batch.origins, strict=True)):
        if index in reasons_by_row:
            raw = json.dumps(record, ensure_ascii=False)
            batch.quarantined.append(QuarantinedRow(origin[0], origin[1], raw, reasons_by_row[index]))
        else:
            kept.append(record)
            kept_origins.append(origin)
    batch.accepted, batch.origins = kept, kept_origins

    counts: Counter[str] = Counter()
    for quarantined in batch.quarantined:
        counts.update(quarantined.reasons)
    rate = len(batch.quarantined) / batch.total if batch.total else 1.0
    failures = []
    if rate > max_quarantine_rate:
        failures.append(f"quarantine rate {rate:.1%} ({len(batch.quarantined)}/{batch.total}) exceeds data.max_quarantine_rate {max_quarantine_rate:.1%}")
    if len(batch.accepted) < min_accepted_rows:
        failures.append(f"only {len(batch.accepted)} rows accepted, data.min_accepted_rows is {min_accepted_rows}")
    report = QualityReport(
        total=batch.total,
        accepted=len(batch.accepted),
        quarantined=len(batch.quarantined),
        reasons=dict(sorted(counts.items())),
        expectations=expectations,
        validation_result=result.to_json_dict(),
        passed=not failures,
        failures=failures,
        checks=intake.summary() if intake is not None else None,
    )
    return report


def format_quality_failure(report: QualityReport) -> str:
    """The message a failed batch raises: thresholds, then every failing check with counts."""
    lines = ["data quality gate failed:"]
    lines += [f"  - {failure}" for failure in report.failures]
    lines.append("  quarantined rows by reason:")
    lines += [f"    {reason}: {count}" for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1])]
    failing = [e for e in report.expectations if not e["success"]]
    if failing:
        lines.append("  failing Great Expectations expectations:")
        lines += [f"    {e['expectation']}({e['column']}): {e['unexpected_count']} unexpected" for e in failing]
    return "\n".join(lines)
