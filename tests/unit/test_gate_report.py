"""The gate report a reviewer opens: a plot per slice linked from the Markdown, one HTML page
with every plot inside, stored under the candidate's version, and clickable locations in the
task log (file:// for a local store, s3:// for S3: a presigned HTTPS URL only in notifications)."""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
import pytest

from tuneloop.gate import decide
from tuneloop.gate_report import render_report_markdown, slice_plot_name, write_report
from tuneloop.steps.gate import gate_step
from tuneloop.steps.loop import open_loop
from tuneloop.storage import LocalStore, S3Store

if TYPE_CHECKING:
    from pathlib import Path

    from tuneloop.gate import GateDecision
    from tuneloop.steps.loop import Loop

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"


def scores(seed: int = 0, n: int = 40) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Baseline and candidate on the same ids: better on `drifted`, equal on `original`,
    worse on `odd name/x` (a slice name that is not a safe file name)."""
    rng = np.random.default_rng(seed)
    baseline, candidate = [], []
    for name, gain in (("drifted", 2), ("original", 0), ("odd name/x", -2)):
        for i in range(n):
            base = int(rng.integers(0, 5))
            moved = base + (gain if rng.random() < 0.7 else 0)
            baseline.append({"id": f"{name}-{i}", "slice": name, "score": base / 6})
            candidate.append({"id": f"{name}-{i}", "slice": name, "score": min(6, max(0, moved)) / 6})
    return baseline, candidate


@pytest.fixture
def decision() -> GateDecision:
    baseline, candidate = scores()
    return decide(baseline, candidate, improve_slices=["drifted"], min_examples=10, n_bootstrap=300)


def test_report_has_an_overview_and_one_png_per_slice_linked_and_embedded(decision: GateDecision, tmp_path: Path) -> None:
    files = write_report(decision, tmp_path, title="Gate: candidate v2 vs production v1")
    assert set(files.slice_plots) == {"drifted", "original", "odd name/x"}
    pngs = {path.name for path in tmp_path.glob("*.png")}
    assert pngs == {files.plot, *files.slice_plots.values()} and len(pngs) == 4
    for name in pngs:
        assert (tmp_path / name).read_bytes().startswith(PNG)
    assert files.slice_plots["odd name/x"] != slice_plot_name("odd_name_x")  # no collision
    assert "/" not in files.slice_plots["odd name/x"]

    markdown = (tmp_path / files.markdown).read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert linked == [files.plot, *files.slice_plots.values()]
    assert "**Decision: REJECT**" in markdown and "| drifted | improve | 40 |" in markdown
    assert "odd name/x: non-inferiority failed" in markdown

    html = (tmp_path / files.html).read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert embedded == [(tmp_path / name).read_bytes() for name in linked]
    assert "<td>odd name/x</td>" in html and "Decision: REJECT" in html
    assert 'src="gate' not in html  # nothing relative: one file is the whole report


def test_markdown_without_plots_is_unchanged(decision: GateDecision) -> None:
    text = render_report_markdown(decision, title="t")
    assert "## Plots" not in text and "![" not in text
    assert text.index("## Reasons") < text.index("## Method")


def _evaluation(loop: Loop) -> dict[str, Any]:
    baseline, candidate = scores()
    prefix = "evals/v2/run1"
    for role, rows in (("production", baseline), ("candidate", candidate)):
        loop.store.put_text(f"{prefix}/{role}/scores.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    snapshot = "0" * 64
    # the gate reads the slices the candidate was trained on from its snapshot's manifest
    counts = {"drifted": 40, "original": 40, "odd name/x": 10}
    loop.store.put_json(
        f"snapshots/{snapshot}/manifest.json",
        {"kind": "tuneloop.dataset_snapshot", "slices": {"train": counts, "eval": counts}, "task": {"metric": "json"}},
    )
    return {
        "version": "v2",
        "snapshot": snapshot,
        "production": "v1",
        "candidate_eval": {"scores_key": f"{prefix}/candidate/scores.jsonl"},
        "production_eval": {"scores_key": f"{prefix}/production/scores.jsonl"},
    }


def _loop(tmp_path: Path, store_lines: list[str], logged: list[str]) -> Loop:
    config = tmp_path / "tuneloop.yaml"
    config.write_text(
        "\n".join(["store:", *store_lines, "gate:", "  min_examples: 10", "  bootstrap_samples: 300", "  improve_slices: [drifted]"]) + "\n"
    )
    return open_loop(str(config), run_id="manual__report-test", progress=logged.append)


def test_gate_step_stores_the_report_with_the_candidate_and_logs_file_urls(tmp_path: Path) -> None:
    logged: list[str] = []
    loop = _loop(tmp_path, [f"  uri: {tmp_path / 'store'}"], logged)
    assert isinstance(loop.store, LocalStore)
    result = gate_step(loop, _evaluation(loop))

    report = result["report"]
    assert report["markdown"] == result["report_key"] == "reports/v2/gate.md"
    assert set(report["slice_plots"]) == {"drifted", "original", "odd name/x"}
    for key in [report["markdown"], report["html"], report["plot"], *report["slice_plots"].values()]:
        assert loop.store.exists(key), key
    stored = loop.store.get_json("reports/v2/gate.json")
    assert stored["promote"] is False and stored["version"] == "v2" and stored["run_id"] == "manual__report-test"
    assert stored["candidate"] == {"adapter_key": "adapters/v2", "scores_key": "evals/v2/run1/candidate/scores.jsonl"}
    assert stored["production"]["version"] == "v1" and stored["report"] == report

    # every location in the log is a file:// URL that opens the stored file
    urls = [url for line in logged for url in re.findall(r"file://\S+", line)]
    assert {urlsplit(url).path.rsplit("/", 1)[-1] for url in urls} == {"gate.md", "gate.html"}
    for url in urls:
        assert (tmp_path / "store" / "reports" / "v2").joinpath(unquote(urlsplit(url).path).rsplit("/", 1)[-1]).is_file()
        assert unquote(urlsplit(url).path) == str(tmp_path / "store" / "reports" / "v2" / urlsplit(url).path.rsplit("/", 1)[-1])
    assert any(line.startswith("gate report (HTML, plots inside): file://") for line in logged)
    assert result["report_links"]["html"] == [url for url in urls if url.endswith("gate.html")][:1]


def _s3_client(endpoint: str, *, session_token: str | None) -> Any:
    """A client with permanent keys (no session token) or temporary ones (with a token)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id="AKIATESTING", aws_secret_access_key="testing", aws_session_token=session_token)
    return session.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def test_gate_step_on_s3_logs_and_returns_the_s3_uri_never_a_presigned_url(
    tmp_path: Path, s3_server: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    logged: list[str] = []
    loop = _loop(tmp_path, [f"  uri: s3://{s3_bucket}/tl", f"  endpoint_url: {s3_server}"], logged)
    assert isinstance(loop.store, S3Store)
    with caplog.at_level("INFO"):
        result = gate_step(loop, _evaluation(loop))

    assert result["report_links"] == {"html": [f"s3://{s3_bucket}/tl/reports/v2/gate.html"], "markdown": [f"s3://{s3_bucket}/tl/reports/v2/gate.md"]}
    assert f"gate report (HTML, plots inside): s3://{s3_bucket}/tl/reports/v2/gate.html" in logged
    assert "gate report: notifications link it through HTTPS presigned for 24 h (not logged: a presigned link grants read access)" in logged
    # Airflow logs a task's return value: neither it nor any progress line or log record holds a signature
    for text in [*logged, json.dumps(result), caplog.text]:
        assert "X-Amz-Signature" not in text and "X-Amz-Security-Token" not in text and "https://" not in text


@pytest.mark.parametrize(
    ("session_token", "settings", "presigned"),
    [
        (None, {}, "without a token"),
        ("FQoGZXIvYXdzEXAMPLETOKEN", {}, None),
        ("FQoGZXIvYXdzEXAMPLETOKEN", {"TUNELOOP__GATE__REPORT_LINKS_WITH_SESSION_TOKEN": "true"}, "with the token"),
        (None, {"TUNELOOP__GATE__REPORT_LINK_HOURS": "0"}, None),
    ],
    ids=["permanent-keys", "temporary-credentials", "temporary-opted-in", "links-off"],
)
def test_notifications_send_a_presigned_link_only_where_the_settings_allow(
    s3_server: str, s3_bucket: str, session_token: str | None, settings: dict[str, str], presigned: str | None
) -> None:
    import types

    from tuneloop.config import load_settings
    from tuneloop.notify import gate_reject_message, gate_report_links

    store = S3Store(s3_bucket, "tl", endpoint_url=s3_server, client=_s3_client(s3_server, session_token=session_token))
    store.put_text("reports/v2/gate.html", "<html>report</html>")
    loop = types.SimpleNamespace(store=store, settings=load_settings(env=settings))
    decision = {"version": "v2", "baseline": "v1", "reasons": [], "report": {"html": "reports/v2/gate.html", "markdown": "reports/v2/gate.md"}}
    links = gate_report_links(loop, decision)
    html = links["gate report (HTML)"]
    assert html[0] == f"s3://{s3_bucket}/tl/reports/v2/gate.html"
    if presigned is None:
        assert html == html[:1]
        assert dict(gate_reject_message(decision, links=links).links)["gate report (HTML)"] == html[0]
        return
    assert len(html) == 2 and "X-Amz-Signature=" in html[1] and "X-Amz-Expires=86400" in html[1]
    assert ("X-Amz-Security-Token=" in html[1]) == (presigned == "with the token")
    # a browser's GET (moto does not check signatures: this shows the URL's shape and content type)
    reply = httpx.get(html[1], timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html") and reply.text == "<html>report</html>"


def test_no_presigned_link_when_switched_off_or_without_credentials(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import boto3

    signed = S3Store(s3_bucket, "tl", endpoint_url=s3_server)
    assert signed.links("reports/v2/gate.md") == [f"s3://{s3_bucket}/tl/reports/v2/gate.md"]
    md = signed.links("reports/v2/gate.md", expires_s=60)
    assert "response-content-type=text%2Fmarkdown" in md[1] and "X-Amz-Expires=60" in md[1]

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    anonymous = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    store = S3Store(s3_bucket, "tl", endpoint_url=s3_server, client=anonymous)
    assert store.links("reports/v2/gate.html", expires_s=60) == [f"s3://{s3_bucket}/tl/reports/v2/gate.html"]
    assert "no presigned URL for" in caplog.text


def test_local_links_are_percent_encoded_file_urls(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "a store")
    [url] = store.links("reports/v2/gate-odd name.png", expires_s=3600)
    assert url.startswith("file:///") and " " not in url
    assert unquote(urlsplit(url).path) == str(tmp_path / "a store" / "reports" / "v2" / "gate-odd name.png")
