"""The data quality gate: a Great Expectations 1.x suite over rows that passed the row checks.

The suite runs on one table per batch: ``id``, ``input`` (what the user sent: the prompt, or
the conversation's non-system turns), ``answer`` (the target), ``slice``, and every top-level
scalar field of the rows under its own name. Built in: unique ids, inputs at most
``task.max_prompt_chars`` long, no prompt injection, and PII (below). The user adds their own
expectations with ``data.expectations``: a GX suite file (JSON or YAML,
``{"expectations": [{"type": "expect_column_values_to_be_in_set", "kwargs": {...}}]}``),
e.g. that ``domain`` is one of a known set or ``labelled_at`` is a timestamp.

Row-level expectations mark individual rows; every row an expectation rejects is moved to
quarantine with the reason ``gx:<expectation>:<column>``. PII follows ``data.pii``: ``flag`` keeps
the e-mail/phone regex expectation (card numbers too, unless the intake checks ran: they test
card numbers with the Luhn checksum, which a regex cannot), ``redact``/``off`` drop it. Batch thresholds (quarantine rate,
minimum accepted rows) raise :class:`DataQualityError` whose message lists every failing
expectation with its counts, so the task log alone says why a refresh stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneloop.intake.rows import CheckedBatch, QuarantinedRow

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.intake.checks import IntakeReport
    from tuneloop.tasks import TaskSpec

RESERVED_COLUMNS = ("_row", "id", "input", "answer", "slice")
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


class ExpectationsFileError(ValueError):
    """``data.expectations`` cannot be read or names an expectation GX does not know."""


def load_user_expectations(path: str | None) -> list[dict[str, Any]]:
    """The expectations of a user's suite file (``data.expectations``), checked to be GX ones."""
    if not path:
        return []
    from pathlib import Path

    import yaml

    from tuneloop.config import load_yaml

    try:
        loaded = load_yaml(Path(path).read_text(encoding="utf-8"), f"data.expectations: {path}")
    except OSError as err:
        raise ExpectationsFileError(f"data.expectations: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ExpectationsFileError(f"data.expectations: {path} is not JSON/YAML: {err}") from None
    items = loaded.get("expectations") if isinstance(loaded, dict) else loaded
    if not isinstance(items, list) or not all(isinstance(item, dict) and isinstance(item.get("type"), str) for item in items):
        raise ExpectationsFileError(f"data.expectations: {path} must hold {{\"expectations\": [{{\"type\": ..., \"kwargs\": {{...}}}}]}}")
    return [{"type": item["type"], "kwargs": dict(item.get("kwargs") or {})} for item in items]


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


def _build_suite(gx: Any, *, max_prompt_chars: int, pii_patterns: list[str], user: list[dict[str, Any]]) -> Any:
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    suite = gx.ExpectationSuite(name="tuneloop_labelled_rows")
    expect = gx.expectations
    suite.add_expectation(expect.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(expect.ExpectColumnValueLengthsToBeBetween(column="input", min_value=1, max_value=max_prompt_chars))
    if pii_patterns:
        suite.add_expectation(expect.ExpectColumnValuesToNotMatchRegexList(column="input", regex_list=pii_patterns))
    suite.add_expectation(expect.ExpectColumnValuesToNotMatchRegex(column="input", regex=INJECTION_PATTERN))
    for item in user:
        try:
            suite.add_expectation(ExpectationConfiguration(type=item["type"], kwargs=item["kwargs"]).to_domain_obj())
        except Exception as err:  # noqa: BLE001 - GX raises several types for an unknown or malformed expectation
            raise ExpectationsFileError(f"data.expectations: {item['type']} {item['kwargs']}: {err}") from None
    return suite


def _frame_columns(rows: list[dict[str, Any]], spec: TaskSpec) -> dict[str, list[Any]]:
    """The table the suite checks: the reserved columns, then the rows' scalar fields."""
    examples = [spec.example(r) for r in rows]
    columns: dict[str, list[Any]] = {
        "_row": list(range(len(rows))),
        "id": [e.id for e in examples],
        "input": [e.input_text for e in examples],
        "answer": [e.target or "" for e in examples],
        "slice": [e.slice for e in examples],
    }
    names = sorted({k for r in rows for k, v in r.items() if k not in RESERVED_COLUMNS and (v is None or isinstance(v, str | int | float | bool))})
    for name in names:
        columns[name] = [r.get(name) if not isinstance(r.get(name), dict | list) else None for r in rows]
    return columns


def run_quality_gate(
    batch: CheckedBatch,
    *,
    max_quarantine_rate: float,
    min_accepted_rows: int,
    spec: TaskSpec,
    pii: str = "flag",
    expectations_file: str | None = None,
    intake: IntakeReport | None = None,
    progress: Callable[[str], None] | None = None,
) -> QualityReport:
    """Run the GX suite on ``batch.accepted``, move failing rows to ``batch.quarantined``,
    then apply the batch thresholds (the caller raises :class:`DataQualityError`).

    ``intake`` is the report of :func:`tuneloop.intake.checks.run_intake_checks` when it ran
    on this batch: its summary joins the report and card numbers are left to its Luhn check."""
    suite = QualitySuite(spec=spec, pii=pii, expectations_file=expectations_file, intake_ran=intake is not None, progress=progress)
    suite.check(batch)
    counts: Counter[str] = Counter()
    for quarantined in batch.quarantined:
        counts.update(quarantined.reasons)
    return suite.report(
        total=batch.total, accepted=len(batch.accepted), reasons=counts,
        max_quarantine_rate=max_quarantine_rate, min_accepted_rows=min_accepted_rows, intake=intake,
    )


class QualitySuite:
    """The GX suite, built once and run on each chunk of a batch (:meth:`check`); :meth:`report`
    sums the chunks and applies the batch thresholds.

    Row-level expectations give the same rows whatever the chunking. A batch-level expectation
    (a mean, a row count) is judged per chunk: it fails the batch when it fails on any chunk,
    and the failure names the chunk. A column of ``data.expectations`` that no row of any chunk
    has is an error (a misspelt column would otherwise pass silently)."""

    def __init__(
        self, *, spec: TaskSpec, pii: str = "flag", expectations_file: str | None = None, intake_ran: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.progress = spec, progress
        self.user = load_user_expectations(expectations_file)
        self.user_columns = sorted({str(c) for item in self.user if (c := item["kwargs"].get("column")) is not None})
        self.pii_patterns = [] if pii != "flag" else [p for kind, p in PII_PATTERNS.items() if not intake_ran or kind != "card_number"]
        self.columns_seen: set[str] = set()
        self.expectations: dict[tuple[str, Any], dict[str, Any]] = {}
        self.results: list[dict[str, Any]] = []
        self.batch_failures: list[str] = []
        self.rows = 0
        self._validation: Any = None
        self._n_expectations = 0

    def _validation_definition(self) -> Any:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        gx_log = logging.getLogger("great_expectations")
        if gx_log.level == logging.NOTSET:  # its INFO lines (decorators, temp dirs) say nothing to a user
            gx_log.setLevel(logging.WARNING)
        import great_expectations as gx

        context = gx.get_context(mode="ephemeral")
        try:
            context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - cosmetic setting; older/newer GX shapes differ
            pass
        asset = context.data_sources.add_pandas("tuneloop").add_dataframe_asset("labelled_rows")
        batch_definition = asset.add_batch_definition_whole_dataframe("batch")
        suite = context.suites.add(
            _build_suite(gx, max_prompt_chars=self.spec.settings.max_prompt_chars, pii_patterns=self.pii_patterns, user=self.user)
        )
        self._n_expectations = len(suite.expectations)
        return context.validation_definitions.add(gx.ValidationDefinition(name="tuneloop_intake", data=batch_definition, suite=suite))

    def check(self, batch: CheckedBatch, *, where: str = "") -> None:
        """Run the suite on ``batch.accepted``; failing rows move to ``batch.quarantined``
        with ``gx:<expectation>:<column>``. ``where`` names the chunk in batch-level failures."""
        import pandas as pd

        rows = batch.accepted
        columns = _frame_columns(rows, self.spec)
        self.columns_seen.update(columns)
        for name in self.user_columns:  # every chunk's table has the columns the user's suite names
            columns.setdefault(name, [None] * len(rows))
        frame = pd.DataFrame(columns)
        if self._validation is None:
            self._validation = self._validation_definition()
        if self.progress:
            self.progress(f"Great Expectations: {self._n_expectations} expectations on {len(rows)} rows{where}")
        result = self._validation.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]},
        )
        self.results.append(result.to_json_dict())
        self.rows += len(rows)
        reasons_by_row: dict[int, list[str]] = {}
        for item in result.results:
            config = item.expectation_config
            if config is None:
                raise RuntimeError("a Great Expectations validation result came without its expectation")
            column = config.kwargs.get("column")
            name = f"gx:{config.type.removeprefix('expect_column_')}:{column}"
            unexpected = item.result.get("unexpected_index_list") or []
            entry = self.expectations.setdefault((config.type, column), {"expectation": config.type, "column": column, "success": True, "unexpected_count": 0})
            entry["success"] = entry["success"] and bool(item.success)
            entry["unexpected_count"] += int(item.result.get("unexpected_count") or 0)
            for found in unexpected:
                row = int(found["_row"] if isinstance(found, dict) else found)
                reasons_by_row.setdefault(row, []).append(name)
            if not item.success and not unexpected:  # a batch-level expectation (a mean, a row count...)
                observed = item.result.get("observed_value")
                observed = observed.item() if hasattr(observed, "item") else observed  # a numpy scalar reads as a number
                self.batch_failures.append(f"expectation {config.type}({column}) failed on the batch{where}: observed {observed!r}")
        kept, kept_origins = [], []
        for index, (record, origin) in enumerate(zip(rows, batch.origins, strict=True)):
            if index in reasons_by_row:
                raw = json.dumps(record, ensure_ascii=False)
                batch.quarantined.append(QuarantinedRow(origin[0], origin[1], raw, reasons_by_row[index]))
            else:
                kept.append(record)
                kept_origins.append(origin)
        batch.accepted, batch.origins = kept, kept_origins

    def report(
        self, *, total: int, accepted: int, reasons: Counter[str] | dict[str, int], max_quarantine_rate: float, min_accepted_rows: int,
        intake: IntakeReport | None = None,
    ) -> QualityReport:
        """The batch's report: every chunk's expectations summed, then the thresholds."""
        missing = [name for name in self.user_columns if name not in self.columns_seen and name not in RESERVED_COLUMNS]
        if missing and self.rows:
            named = "; ".join(f"{item['type']} names column {item['kwargs']['column']!r}" for item in self.user if item["kwargs"].get("column") in missing)
            raise ExpectationsFileError(f"data.expectations: {named}, which no row has; columns: {sorted(self.columns_seen)}")
        quarantined = total - accepted
        rate = quarantined / total if total else 1.0
        failures = list(self.batch_failures)
        if rate > max_quarantine_rate:
            failures.append(f"quarantine rate {rate:.1%} ({quarantined}/{total}) exceeds data.max_quarantine_rate {max_quarantine_rate:.1%}")
        if accepted < min_accepted_rows:
            failures.append(f"only {accepted} rows accepted, data.min_accepted_rows is {min_accepted_rows}")
        if len(self.results) == 1:
            validation_result = self.results[0]
        else:
            validation_result = {"success": all(r.get("success") for r in self.results), "chunks": self.results}
        return QualityReport(
            total=total,
            accepted=accepted,
            quarantined=quarantined,
            reasons=dict(sorted(reasons.items())),
            expectations=list(self.expectations.values()),
            validation_result=validation_result,
            passed=not failures,
            failures=failures,
            checks=intake.summary() if intake is not None else None,
        )


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
