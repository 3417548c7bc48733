"""The gate step: promote or reject with paired statistics per slice (:mod:`tuneloop.gate`),
the suites held to their bars, and the report stored beside the candidate's version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tuneloop.steps.loop import Loop


def gate_step(loop: Loop, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Decide promote/reject with paired statistics; store the report next to the candidate's
    version (``reports/<version>/``: gate.json, gate.md and gate.html, gate.png and one
    gate-<slice>.png per slice) and log where to open it (file:// or s3://). A presigned HTTPS
    link is never logged nor returned (the task's return value is logged too): it grants read
    access, and under temporary credentials carries their session token. Notifications sign
    their own (``notify.store_links``)."""
    from tuneloop import gate, gate_report

    cfg = loop.settings.gate
    version = evaluation["version"]
    baseline = list(loop.store.iter_jsonl(evaluation["production_eval"]["scores_key"]))
    candidate = list(loop.store.iter_jsonl(evaluation["candidate_eval"]["scores_key"]))
    improve, why = improve_slices_for(loop, evaluation, {row["slice"] for row in candidate})
    loop.progress(f"gate: improve slices {improve} ({why})")
    decision = gate.decide(
        [_score_row(r) for r in baseline],
        [_score_row(r) for r in candidate],
        improve_slices=improve,
        margin=cfg.margin,
        alpha=cfg.alpha,
        min_examples=cfg.min_examples,
        n_bootstrap=cfg.bootstrap_samples,
    )
    suites = dict(evaluation["candidate_eval"].get("suites") or {})
    if loop.settings.data.label_source == "teacher":
        suites["teacher_retention"] = teacher_retention_block(loop, evaluation, candidate)
    decision = gate.apply_suite_bars(decision, suites, cfg.suite_bars.model_dump())
    baseline_name = evaluation.get("production") or "base model"
    title = f"Gate: candidate {version} vs production {baseline_name}"
    prefix = layout.report(version)
    import tempfile

    # The report is keyed by the candidate's version, and its gate.json names the candidate's
    # adapter and the eval outputs it was computed from. Written last, gate.json marks a
    # complete report.
    with tempfile.TemporaryDirectory() as tmp:
        files = gate_report.write_report(decision, tmp, title=title)
        for name in files.names():
            loop.store.put_file(f"{prefix}/{name}", Path(tmp) / name)
    keys: dict[str, Any] = {
        "markdown": f"{prefix}/{files.markdown}",
        "html": f"{prefix}/{files.html}",
        "plot": f"{prefix}/{files.plot}",
        "slice_plots": {name: f"{prefix}/{file}" for name, file in files.slice_plots.items()},
    }
    loop.store.put_json(
        f"{prefix}/gate.json",
        {
            **decision.to_json(),
            "version": version,
            "baseline": baseline_name,
            "run_id": loop.run_id,
            "candidate": {"adapter_key": layout.adapter(version), "scores_key": evaluation["candidate_eval"]["scores_key"]},
            "production": {"version": evaluation.get("production"), "scores_key": evaluation["production_eval"]["scores_key"]},
            "report": keys,
            **({"teacher_retention": suites["teacher_retention"]} if "teacher_retention" in suites else {}),
        },
    )
    links = {kind: loop.store.links(keys[kind])[:1] for kind in ("markdown", "html")}
    verdict = "PROMOTE" if decision.promote else "REJECT"
    loop.progress(f"gate: {verdict} {version} vs {baseline_name}")
    for reason in decision.reasons:
        loop.progress(f"  - {reason}")
    loop.progress(f"gate report (Markdown, a plot per slice): {links['markdown'][0]}")
    loop.progress(f"gate report (HTML, plots inside): {links['html'][0]}")
    if cfg.report_link_hours > 0 and links["html"][0].startswith("s3://"):
        loop.progress(
            f"gate report: notifications link it through HTTPS presigned for {cfg.report_link_hours:g} h "
            "(not logged: a presigned link grants read access)"
        )
    result = {
        "version": version,
        "baseline": baseline_name,
        "report_key": keys["markdown"],
        "report": keys,
        "report_links": links,
        "scores_key": evaluation["candidate_eval"]["scores_key"],  # deploy verifies against these answers
        **decision.to_json(),
    }
    if loop.tracker is not None:
        loop.tracker.log_gate(result)
        if not decision.promote:
            loop.tracker.finish()
    return result


def improve_slices_for(loop: Loop, evaluation: Mapping[str, Any], present: set[str]) -> tuple[list[str], str]:
    """The slices the candidate must improve on. The first adapter (compared with the bare base
    model) must be better on the slices it was trained on; later ones follow
    ``gate.improve_slices``, where ``auto`` means the slices of the latest drift check that
    asked for a refresh, else the slices of the candidate's training data."""
    from tuneloop import gate
    from tuneloop.steps.monitor import drift_history
    from tuneloop.storage import StoreKeyError, read_snapshot_manifest

    try:
        manifest = read_snapshot_manifest(loop.store, layout.SNAPSHOTS, evaluation["snapshot"])
    except StoreKeyError:
        manifest = {}  # a snapshot trained on outside the store: nothing says what it covered
    counts = manifest.get("slices") or manifest.get("domains") or {}
    trained_on = set(counts.get("train", {}))
    if evaluation.get("production") is None:
        return gate.resolve_improve_slices([gate.AUTO], present, trained_on=trained_on)
    emitted = [check for check in drift_history(loop.store) if check.get("emit")]
    evidence = emitted[-1].get("drift_slices") if emitted else None
    return gate.resolve_improve_slices(list(loop.settings.gate.improve_slices), present, evidence=evidence, trained_on=trained_on)


def teacher_retention_block(loop: Loop, evaluation: Mapping[str, Any], candidate: list[dict[str, Any]]) -> dict[str, Any]:
    """``data.label_source: teacher``: the teacher on the held-out rows the candidate was scored
    on (its answers cached like the labels), the candidate's score as a share of the teacher's,
    and the latency/cost of the served model (production's name, the base model's before the first
    promotion: the candidate is not served yet) against the teacher's through the same client. Never fails the gate by itself: a teacher
    that does not answer is reported as skipped (``gate.suite_bars.min_teacher_retention`` then
    rejects, as for any bar without a result)."""
    from tuneloop.config import TeacherSettings
    from tuneloop.intake.teacher import TeacherError, teacher_retention
    from tuneloop.steps.evaluate import eval_sources

    settings = loop.settings
    cfg = settings.teacher
    records = [row for key in eval_sources(loop, evaluation["snapshot"]) for row in loop.store.iter_jsonl(key) if isinstance(row, dict)]
    student = None
    if settings.vllm.endpoints:
        from tuneloop.serving.verify import base_name

        # production's name; before the first promotion nothing is served under it: the base model's
        served = settings.model.served_model_name if evaluation.get("production") else base_name(settings.model.served_model_name)
        student = TeacherSettings(
            endpoint=f"{settings.vllm.endpoints[0].rstrip('/')}/v1", model=served,
            api_key=settings.vllm.key, max_tokens=settings.eval.max_new_tokens, timeout_s=settings.vllm.timeout_s, max_retries=2,
        )
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(settings.work_dir) / "teacher-cache"
    try:
        block = teacher_retention(records, candidate, loop.spec, cfg, cache_dir=cache, student=student)
    except TeacherError as err:
        block = {"skipped": str(err)}
    if "retention" in block:
        latency = block.get("latency") or {}
        loop.progress(
            f"gate: the candidate keeps {block['retention']} of the teacher's score ({block['student']} vs {block['teacher']}, "
            f"n={block['n']}); latency student/teacher {latency.get('latency_ratio')}, cost {latency.get('cost_ratio')}"
        )
    else:
        loop.progress(f"gate: no teacher retention ({block.get('skipped')})")
    return block


def _score_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "slice": row["slice"], "score": row["score"]}
