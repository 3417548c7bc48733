"""The tuneloop view: the adapter registry, the drift history and the eval history on one page.

``plugins/tuneloop_ui.py`` serves it from the Airflow API server (and links it in the Airflow
UI's navigation); everything here is plain Python that reads only the store, so it is tested
without Airflow. The page is server-rendered and self-contained: CSS inline, plots inline as
PNG data URIs, no JavaScript, nothing fetched from elsewhere (the machines may be offline).

What it shows, all read from the store the DAG tasks write:

* the registry (``registry/``): every version with its aliases, creation time, dataset
  snapshot, base model, training metrics, the gate's per-slice scores and decision with its
  reasons, and a link to the stored gate report (``reports/<version>/gate.html``);
* the recent alias moves (promotions, rollbacks) with their reasons;
* the drift history plot (``drift/history.png``, redrawn from ``drift/checks/`` if missing)
  and the newest check's decision;
* the eval history plot (drawn here): per version, each slice's mean score and the paired
  candidate - baseline delta with its confidence interval, as the gate computed them.

Every text from the store is HTML-escaped. A store that cannot be read gives a page naming
the cause (and HTTP 503), never a stack trace.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from tuneloop import layout

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from tuneloop.storage import Store

log = logging.getLogger(__name__)

#: Environment variable naming the store to show (a path, file:// or s3:// URI); it wins over
#: the settings' ``store.uri`` (endpoint and region still come from the settings).
STORE_ENV = "TUNELOOP_UI_STORE"
EMPTY_MESSAGE = "no versions yet: run make demo / trigger tuneloop_refresh"
#: Sent with every page and report: nothing but inline styles and data: images may load, and
#: only Airflow's own pages (same origin) may frame them.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
ALIAS_MOVES_SHOWN = 8
#: The DAGs whose results the page shows (registry, evaluations and gate: the refresh; drift:
#: the monitor; alias moves: the rollback too). Airflow's read access to all of them is what
#: lets a user see the page; the page offers no action.
VIEW_DAG_IDS = ("tuneloop_refresh", "tuneloop_drift_monitor", "tuneloop_rollback")
REPORT_NAME_RE = re.compile(r"^gate(-[A-Za-z0-9._-]+)?\.(html|md|json|png)$")
_REPORT_TYPES = {
    "html": "text/html; charset=utf-8",
    "md": "text/plain; charset=utf-8",  # shown as text, not downloaded
    "json": "application/json",
    "png": "image/png",
}
_ALIAS_ORDER = ("production", "previous", "candidate")


class ViewNotFoundError(LookupError):
    """A report file that is not in the store, or a name the view does not serve."""


def forbidden_message(user: str, denied: Iterable[str]) -> str:
    """The 403 text for a signed-in user who lacks read access to some of :data:`VIEW_DAG_IDS`."""
    return (
        f"user {user!r} may not read the Airflow DAG(s) {', '.join(denied)}: the tuneloop view shows their "
        "results (registry, evaluations, gate decisions, drift), so it needs read access to "
        f"{', '.join(VIEW_DAG_IDS)}. Ask an Airflow admin to grant it."
    )


# --- reading the store ----------------------------------------------------------------------


def open_view_store(
    *, env: Mapping[str, str] | None = None, config_variable: Callable[[], str | None] | None = None
) -> tuple[Store, str]:
    """The store to show and where its location came from.

    Settings as the DAG tasks load them (:func:`tuneloop.config.choose_task_config`), then
    ``TUNELOOP__*`` overrides, and ``$TUNELOOP_UI_STORE`` replaces ``store.uri``.
    """
    from tuneloop.config import choose_task_config, load_settings
    from tuneloop.storage import open_store_from_settings

    env = os.environ if env is None else env
    config, settings_env = choose_task_config(env, config_variable, lambda text: log.warning("tuneloop view: %s", text))
    settings = load_settings(config, env=settings_env)
    source = f"config {config}" if config else "embedded defaults"
    override = env.get(STORE_ENV)
    if override:
        settings.store.uri = override if "://" in override else os.path.abspath(override)
        source = f"${STORE_ENV}"
    return open_store_from_settings(settings), source


@dataclass
class VersionRow:
    """One registry version with what the gate said about it."""

    record: dict[str, Any]
    aliases: list[str]
    gate: dict[str, Any] | None = None
    problem: str | None = None  # why its gate result could not be read

    @property
    def version(self) -> str:
        return str(self.record.get("version"))


@dataclass
class LoopView:
    """Everything the page shows, read from one store."""

    store_uri: str
    source: str
    versions: list[VersionRow]  # oldest first
    aliases: dict[str, str | None]
    alias_moves: list[dict[str, Any]]  # newest first
    drift_checks: list[dict[str, Any]]  # oldest first
    drift_png: bytes | None = None
    eval_png: bytes | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.versions and not self.drift_checks


def load_view(store: Store, *, source: str = "") -> LoopView:
    """Read registry, gate results and drift history; draw the eval history plot.

    A version whose gate result is unreadable keeps its row (with the problem named); a
    registry or drift history that cannot be read at all raises.
    """
    from tuneloop.registry import Registry
    from tuneloop.steps.monitor import drift_history, plot_drift_history
    from tuneloop.storage import StorageError, StoreKeyError

    registry = Registry(store)
    records = registry.versions()
    aliases = registry.aliases()
    by_version: dict[str, list[str]] = {}
    for alias in _ALIAS_ORDER:
        target = aliases.get(alias)
        if target:
            by_version.setdefault(target, []).append(alias)
    rows = []
    for record in records:
        row = VersionRow(record=record, aliases=by_version.get(str(record.get("version")), []))
        try:
            gate = store.get_json(layout.gate_decision(row.version))
            if isinstance(gate, dict) and isinstance(gate.get("slices"), dict):
                row.gate = gate
            else:
                row.problem = f"reports/{row.version}/gate.json is not a gate result"
        except StoreKeyError:
            pass  # not evaluated yet, or the run stopped before the gate
        except StorageError as err:
            row.problem = str(err)
        rows.append(row)
    moves = list(reversed(registry.history()))[:ALIAS_MOVES_SHOWN]
    checks = drift_history(store)
    view = LoopView(
        store_uri=store.uri, source=source, versions=rows, aliases=aliases, alias_moves=moves, drift_checks=checks
    )
    if checks:
        try:
            view.drift_png = store.get_bytes(layout.DRIFT_HISTORY_PLOT)
        except StoreKeyError:
            view.drift_png = plot_drift_history(checks)
    gated = [(row.version, row.gate) for row in rows if row.gate is not None]
    if gated:
        try:
            view.eval_png = plot_eval_history(gated)
        except (KeyError, TypeError, ValueError) as err:  # a gate result of an older format
            view.problems.append(f"cannot draw the eval history: {type(err).__name__}: {err}")
    return view


def report_file(store: Store, version: str, name: str) -> tuple[bytes, str]:
    """A file of a stored gate report (``reports/<version>/<name>``) and its content type."""
    from tuneloop.registry import VERSION_RE
    from tuneloop.storage import StoreKeyError

    if not VERSION_RE.match(version) or not REPORT_NAME_RE.match(name):
        raise ViewNotFoundError(f"no report file {version}/{name}: the view serves reports/v<N>/gate*.{{html,md,json,png}}")
    try:
        data = store.get_bytes(f"reports/{version}/{name}")
    except StoreKeyError:
        raise ViewNotFoundError(f"reports/{version}/{name} is not in {store.uri}") from None
    return data, _REPORT_TYPES[name.rsplit(".", 1)[1]]


# --- the eval history plot ------------------------------------------------------------------


def plot_eval_history(gated: list[tuple[str, dict[str, Any]]]) -> bytes:
    """A PNG of the gate's numbers per version (oldest left): top, each slice's mean score of
    the candidate (solid) and of the baseline it was compared with (dotted); bottom, the
    paired delta with its CI (filled: the slice passed its rule), with lines at 0 and at
    -margin (the non-inferiority bound)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names: list[str] = []
    for _, gate in gated:
        for name in [*gate.get("improve_slices", []), *gate["slices"]]:
            if name in gate["slices"] and name not in names:
                names.append(name)
    colors = plt.get_cmap("tab10")
    xs = list(range(len(gated)))
    fig, (ax_mean, ax_delta) = plt.subplots(
        2, 1, figsize=(8, 5.6), sharex=True, gridspec_kw={"height_ratios": [1, 1.15]}
    )
    try:
        width = min(0.3, 0.5 / max(len(names), 1))
        for k, name in enumerate(names):
            color = colors(k % 10)
            points = [(i, gate["slices"][name]) for i, (_, gate) in enumerate(gated) if name in gate["slices"]]
            px = [i for i, _ in points]
            ax_mean.plot(px, [s["candidate_mean"] for _, s in points], marker="o", color=color, label=f"{name}: candidate")
            ax_mean.plot(
                px, [s["baseline_mean"] for _, s in points], marker="o", mfc="white", ls=":", color=color,
                label=f"{name}: baseline",
            )
            offset = (k - (len(names) - 1) / 2) * width
            for i, s in points:
                ax_delta.errorbar(
                    i + offset, s["delta"], yerr=[[s["delta"] - s["ci_low"]], [s["ci_high"] - s["delta"]]],
                    fmt="o", color=color, mfc=color if s.get("passed") else "white", capsize=4,
                    label=name if i == px[0] else None,
                )
        margin = float(gated[-1][1].get("margin", 0.0))
        ci_level = float(gated[-1][1].get("ci_level", 0.95))
        ax_delta.axhline(0.0, color="black", lw=0.8)
        if margin:
            ax_delta.axhline(-margin, color="tab:orange", lw=0.9, ls="--", label=f"-margin ({-margin:g})")
        ax_mean.set_ylim(-0.02, 1.05)
        ax_mean.set_ylabel("mean score")
        ax_mean.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, ncol=4, frameon=False)
        ax_mean.grid(axis="y", alpha=0.3)
        ax_delta.set_ylabel(f"candidate - baseline\n({ci_level * 100:g}% CI)")
        ax_delta.legend(loc="best", fontsize=7)
        ax_delta.grid(axis="y", alpha=0.3)
        ax_delta.set_xlim(-0.5, len(gated) - 0.5)
        labels = [
            f"{version}\n{'PROMOTE' if gate.get('promote') else 'REJECT'}\nvs {gate.get('baseline') or '?'}"
            for version, gate in gated
        ]
        ax_delta.set_xticks(xs, labels, fontsize=8)
        for tick, (_, gate) in zip(ax_delta.get_xticklabels(), gated, strict=True):
            tick.set_color("tab:green" if gate.get("promote") else "tab:red")
        fig.suptitle("tuneloop eval history (gate scores per version; filled = slice passed)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buffer.getvalue()


# --- rendering ------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, fmt)


def _png(data: bytes, alt: str, element_id: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img id="{element_id}" class="plot" alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _short_model(base_model: Any) -> str:
    text = "" if base_model is None else str(base_model)
    parts = PurePosixPath(text).parts if text.startswith("/") else ()
    shown = f".../{'/'.join(parts[-2:])}" if len(parts) > 3 else text
    return f'<code title="{_e(text)}">{_e(shown) or "-"}</code>'


def _created(record: dict[str, Any]) -> str:
    """Date and time (UTC); the run that trained it is in the tooltip and the alias moves."""
    created = str(record.get("created_at") or "")
    day, _, time = created.partition("T")
    utc = " UTC" if time.endswith("+00:00") else ""
    return f'{_e(day)}<div class="muted small">{_e(time.removesuffix("+00:00"))}{utc}</div>'


def _snapshot(record: dict[str, Any]) -> str:
    snapshot = record.get("snapshot")
    if not snapshot:
        return '<span class="muted">-</span>'
    return f'<code title="{_e(snapshot)}">{_e(str(snapshot)[:12])}</code>'


def _training(record: dict[str, Any]) -> str:
    train = (record.get("metrics") or {}).get("train") or {}
    if not train:
        return '<span class="muted">-</span>'
    lines = [f"loss {_num(train.get('first_loss'))} &rarr; {_num(train.get('final_loss'))}"]
    detail = [f"{_e(train['steps'])} steps" if train.get("steps") is not None else ""]
    if isinstance(train.get("seconds"), int | float):
        detail.append(f"{train['seconds']:.0f} s")
    if train.get("device"):
        detail.append(_e(train["device"]))
    lines.append(", ".join(d for d in detail if d))
    lines.append(f"warm start from {_e(train['init_from'])}" if train.get("init_from") else "fresh LoRA weights")
    return "<br>".join(line for line in lines if line)


def _slices(row: VersionRow) -> str:
    if row.problem:
        return f'<span class="error">{_e(row.problem)}</span>'
    if row.gate is None:
        return '<span class="muted">not gated yet</span>'
    gate = row.gate
    body = []
    for name, s in gate["slices"].items():
        passed = bool(s.get("passed"))
        body.append(
            "<tr>"
            f"<td>{_e(name)}</td>"
            f'<td class="num">{_num(s.get("baseline_mean"))} &rarr; <b>{_num(s.get("candidate_mean"))}</b></td>'
            f'<td class="num">{_num(s.get("delta"), "+.3f")} <span class="muted">[{_num(s.get("ci_low"), "+.3f")}, {_num(s.get("ci_high"), "+.3f")}]</span></td>'
            f'<td class="muted">{_e(str(s.get("rule", "")).replace("_", "-"))}, n={_e(s.get("n"))}</td>'
            f'<td class="{"pass" if passed else "fail"}">{"pass" if passed else "FAIL"}</td>'
            "</tr>"
        )
    level = gate.get("ci_level")
    level_text = f"{level * 100:g}% CI" if isinstance(level, int | float) else "CI"
    head = (
        f'<tr><th>slice</th><th>baseline &rarr; candidate</th><th>delta [{_e(level_text)}]</th>'
        "<th>rule</th><th></th></tr>"
    )
    return f'<table class="inner">{head}{"".join(body)}</table>'


def _gate(row: VersionRow, base: str) -> str:
    gate = row.gate
    if gate is None:
        return '<span class="muted">-</span>'
    promote = bool(gate.get("promote"))
    verdict = f'<span class="badge {"promote" if promote else "reject"}">{"PROMOTE" if promote else "REJECT"}</span>'
    against = f' <span class="muted small">vs {_e(gate.get("baseline") or "?")}</span>'
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in gate.get("reasons") or [])
    link = ""
    report = gate.get("report") or {}
    for kind, label in (("html", "gate report"), ("markdown", "gate report (Markdown)")):
        key = report.get(kind)
        name = PurePosixPath(str(key)).name if key else ""
        if key == f"reports/{row.version}/{name}" and REPORT_NAME_RE.match(name):
            href = f"{base}/reports/{quote(row.version)}/{quote(name)}"
            link = f'<div><a class="report" href="{_e(href)}" target="_blank" rel="noopener">{label} &#8599;</a></div>'
            break
    return f'{verdict}{against}<ul class="reasons">{reasons}</ul>{link}'


def _aliases(row: VersionRow) -> str:
    return "".join(f'<span class="badge {_e(alias)}">{_e(alias)}</span>' for alias in row.aliases)


def _registry_table(view: LoopView, base: str) -> str:
    if not view.versions:
        return f'<p class="empty" id="registry-empty">{_e(EMPTY_MESSAGE)}</p>'
    rows = []
    for row in reversed(view.versions):  # newest first
        record = row.record
        rows.append(
            f'<tr class="version" data-version="{_e(row.version)}">'
            f'<td><b class="vname">{_e(row.version)}</b><div>{_aliases(row)}</div></td>'
            f'<td class="nowrap" title="run {_e(record.get("run_id") or "-")}">{_created(record)}</td>'
            f'<td class="nowrap small">snapshot {_snapshot(record)}<br>base {_short_model(record.get("base_model"))}</td>'
            f'<td class="small nowrap">{_training(record)}</td>'
            f"<td>{_slices(row)}</td>"
            f'<td class="gate">{_gate(row, base)}</td>'
            "</tr>"
        )
    head = (
        "<tr><th>version</th><th>created</th><th>lineage</th>"
        "<th>training</th><th>eval per slice (gate)</th><th>gate decision</th></tr>"
    )
    return f'<table id="registry" class="registry"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _alias_moves(view: LoopView) -> str:
    if not view.alias_moves:
        return ""
    rows = []
    for move in view.alias_moves:
        changed = ", ".join(
            f"{_e(alias)}: {_e(change.get('from') or '-')} &rarr; {_e(change.get('to') or '-')}"
            if isinstance(change, dict) else f"{_e(alias)}: ?"
            for alias, change in (move.get("changed") or {}).items()
        )
        rows.append(
            f"<tr><td class=\"num\">{_e(move.get('generation'))}</td><td>{_e(move.get('at'))}</td>"
            f"<td>{changed}</td><td>{_e(move.get('reason'))}</td><td class=\"muted small\">{_e(move.get('run_id'))}</td></tr>"
        )
    return (
        '<h3>Alias moves <span class="muted small">(newest first)</span></h3>'
        '<table id="alias-moves" class="moves"><tr><th>#</th><th>at</th><th>change</th><th>reason</th><th>run</th></tr>'
        f'{"".join(rows)}</table>'
    )


def _drift_section(view: LoopView) -> str:
    if view.drift_png is None:
        body = '<p class="empty">no drift checks yet: tuneloop_drift_monitor stores one per run</p>'
    else:
        body = _png(view.drift_png, "drift history: AUC and p-value per check", "drift-plot")
        last = view.drift_checks[-1]
        window = " .. ".join(str(day) for day in last.get("current_window") or [])
        verdict = "drift" if last.get("drift") else "no drift"
        body += (
            f'<p class="caption">{len(view.drift_checks)} check(s). Newest: as of <b>{_e(last.get("as_of"))}</b> '
            f"(window {_e(window)}): AUC {_num(last.get('statistic'))}, p={_num(last.get('p_value'), '.3g')}, "
            f'<b class="{"fail" if last.get("drift") else "pass"}">{verdict}</b>'
            f'{", refresh requested" if last.get("emit") else ""}. {_e(last.get("decision"))}</p>'
        )
    return f'<section class="card plot-card"><h2>Drift history</h2>{body}</section>'


def _eval_section(view: LoopView) -> str:
    if view.eval_png is None:
        body = '<p class="empty">no gate results yet: the gate of tuneloop_refresh stores one per candidate</p>'
    else:
        body = _png(view.eval_png, "eval history: per-slice scores and deltas with CIs per version", "eval-plot")
        body += (
            '<p class="caption">Per version, as its gate computed them on the same held-out rows: '
            "mean score of the candidate and of the baseline it was compared with, and the paired "
            "delta with its bootstrap interval.</p>"
        )
    return f'<section class="card plot-card"><h2>Eval history</h2>{body}</section>'


_STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  padding: 16px 20px 28px; background: #f4f6f8; color: #1d2730; }
h1 { font-size: 20px; margin: 0 0 2px; } h2 { font-size: 16px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 18px 0 6px; }
.header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 12px; }
.card { background: #fff; border: 1px solid #dde3e9; border-radius: 8px; padding: 14px 16px;
  margin-bottom: 16px; box-shadow: 0 1px 2px rgba(16, 24, 40, .04); }
.scroll { overflow-x: auto; }
.muted { color: #66727e; } .small { font-size: 12px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f0f3f6;
  padding: 1px 4px; border-radius: 4px; white-space: nowrap; }
table { border-collapse: collapse; }
table.registry { width: 100%; }
table.registry > thead th { text-align: left; font-size: 12px; text-transform: uppercase;
  letter-spacing: .03em; color: #55616d; border-bottom: 2px solid #dde3e9; padding: 6px 8px; }
table.registry > tbody > tr > td { vertical-align: top; padding: 9px 8px; border-bottom: 1px solid #e8ecf0; }
td.nowrap { white-space: nowrap; }
table.registry > tbody > tr:nth-child(even) { background: #fafbfc; }
table.inner td, table.inner th { padding: 1px 8px 1px 0; font-size: 12px; white-space: nowrap; }
table.inner th { text-align: left; color: #66727e; font-weight: 600; }
table.moves td, table.moves th { padding: 3px 10px 3px 0; font-size: 12px; text-align: left;
  border-bottom: 1px solid #eef1f4; }
.num { font-variant-numeric: tabular-nums; }
.vname { font-size: 15px; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 10px;
  padding: 1px 8px; margin: 3px 4px 0 0; color: #fff; background: #7b8794; }
.badge.production { background: #1a7f37; } .badge.previous { background: #6e7781; }
.badge.candidate { background: #bf8700; } .badge.promote { background: #1a7f37; }
.badge.reject { background: #cf222e; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
ul.reasons { margin: 6px 0 4px; padding-left: 16px; font-size: 12px; max-width: 300px; }
td.gate { min-width: 240px; }
a.report { font-size: 12px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 16px; }
.plot-card { margin-bottom: 0; }
img.plot { display: block; width: 100%; max-width: 880px; height: auto; margin: 0 auto; }
.caption { font-size: 12px; color: #44505c; margin: 8px 0 0; }
.empty { padding: 14px; background: #f6f8fa; border: 1px dashed #c5ced8; border-radius: 6px; }
.error { color: #cf222e; }
.problem { border-left: 4px solid #cf222e; }
"""


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _header(store_uri: str, source: str, aliases: Mapping[str, str | None] | None) -> str:
    alias_text = ""
    if aliases:
        alias_text = " &middot; ".join(f"{_e(a)} <b>{_e(aliases.get(a) or '-')}</b>" for a in _ALIAS_ORDER)
        alias_text = f'<div id="aliases">{alias_text}</div>'
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    where = f"store <code>{_e(store_uri)}</code>" + (f" ({_e(source)})" if source else "")
    return (
        f'<div class="header"><div><h1>tuneloop</h1><div class="muted small">{where} &middot; read {now}</div></div>'
        f"{alias_text}</div>"
    )


def render_view(view: LoopView, *, base: str = "") -> str:
    """The page for ``view``; ``base`` is the URL path the view is served under (for links)."""
    base = base.rstrip("/")
    parts = [_header(view.store_uri, view.source, view.aliases if view.versions else None)]
    if view.empty:
        parts.append(
            f'<section class="card"><p class="empty" id="empty-state"><b>{_e(EMPTY_MESSAGE)}</b><br>'
            f"The store <code>{_e(view.store_uri)}</code> holds no adapter versions and no drift checks.</p></section>"
        )
        return _document("tuneloop", "".join(parts))
    for problem in view.problems:
        parts.append(f'<section class="card problem"><span class="error">{_e(problem)}</span></section>')
    parts.append(
        '<section class="card"><h2>Adapter registry</h2>'
        f'<div class="scroll">{_registry_table(view, base)}</div>{_alias_moves(view)}</section>'
    )
    parts.append(f'<div class="plots">{_drift_section(view)}{_eval_section(view)}</div>')
    return _document("tuneloop", "".join(parts))


def render_error(cause: BaseException | str, *, store_uri: str | None = None) -> str:
    """A page that names why the store could not be read (no stack trace)."""
    text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    where = f" <code>{_e(store_uri)}</code>" if store_uri else ""
    body = (
        '<div class="header"><h1>tuneloop</h1></div>'
        f'<section class="card problem" id="store-error"><h2>Cannot read the tuneloop store{where}</h2>'
        f'<pre class="error" style="white-space: pre-wrap">{_e(text)}</pre>'
        f'<p class="muted small">Check the store settings of the API server (<code>{STORE_ENV}</code>, '
        "<code>TUNELOOP_CONFIG</code> or the <code>tuneloop_config</code> Variable, "
        "<code>TUNELOOP__STORE__*</code>) and its credentials.</p></section>"
    )
    return _document("tuneloop: store error", body)


@dataclass(frozen=True)
class Page:
    """An HTML page and its HTTP status."""

    html: str
    status: int = 200


def build_page(open_store: Callable[[], tuple[Store, str]], *, base: str = "") -> Page:
    """Open the store, read it and render the page; any failure becomes a 503 page naming it."""
    store_uri = None
    try:
        store, source = open_store()
        store_uri = store.uri
        return Page(render_view(load_view(store, source=source), base=base))
    except Exception as err:  # the page names every cause; the log keeps the traceback
        log.exception("tuneloop view: cannot read the store %s", store_uri or "(not opened)")
        return Page(render_error(err, store_uri=store_uri), status=503)


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "EMPTY_MESSAGE",
    "STORE_ENV",
    "VIEW_DAG_IDS",
    "LoopView",
    "Page",
    "VersionRow",
    "ViewNotFoundError",
    "build_page",
    "forbidden_message",
    "load_view",
    "open_view_store",
    "plot_eval_history",
    "render_error",
    "render_view",
    "report_file",
]
