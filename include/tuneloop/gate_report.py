"""The gate's report for people: Markdown (a table row per slice, every reason, the method), an
HTML page with the plots inside, an overview plot of every slice's difference with its
interval, and one plot per slice. The decision itself is :mod:`tuneloop.gate`."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from tuneloop.gate import GateDecision



def slice_table_markdown(
    slices: Mapping[str, Mapping[str, Any]], improve_slices: Sequence[str], ci_level: float
) -> list[str]:
    """The per-slice Markdown table (also shown to a human approver): one row per slice
    with n, both means, the delta, its interval, the p-value and the result."""
    level = f"{ci_level * 100:g}%"
    lines = [
        f"| slice | rule | n | baseline | candidate | delta | {level} CI | p (improvement) | result |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, row in slices.items():
        lines.append(
            f"| {name} | {row['rule']} | {row['n']} | {row['baseline_mean']:.3f} "
            f"| {row['candidate_mean']:.3f} | {row['delta']:+.3f} "
            f"| [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['p_value']:.3g} "
            f"| {'pass' if row['passed'] else 'FAIL'} |"
        )
    for name in improve_slices:
        if name not in slices:
            lines.append(f"| {name} | improve | 0 | - | - | - | - | - | FAIL (no rows) |")
    return lines


def _method_text(decision: GateDecision) -> str:
    level = f"{decision.ci_level * 100:g}%"
    return (
        f"Paired differences (candidate - baseline) per id. CI: paired percentile bootstrap, "
        f"two-sided {level}. p: one-sided sign-flip permutation test of mean difference > 0. "
        f"improve slices need CI low > 0 and p < {decision.alpha}; other slices need "
        f"CI low > -{decision.margin}; every slice needs n >= {decision.min_examples}."
    )


def _parameters_text(decision: GateDecision) -> str:
    return (
        f"alpha {decision.alpha}, margin {decision.margin}, min_examples {decision.min_examples}, "
        f"{decision.n_bootstrap} resamples, seed {decision.seed}, {decision.n_pairs} paired examples"
    )


def render_report_markdown(
    decision: GateDecision,
    title: str = "Eval gate",
    *,
    plot: str | None = None,
    slice_plots: Mapping[str, str] | None = None,
) -> str:
    """A Markdown report: the verdict, one table row per slice, every reason, the method, and
    (when given, as links relative to the report) the overview plot and one plot per slice."""
    verdict = "PROMOTE" if decision.promote else "REJECT"
    lines = [
        f"# {title}",
        "",
        f"**Decision: {verdict}** ({_parameters_text(decision)})",
        "",
        *slice_table_markdown(decision.slices, decision.improve_slices, decision.ci_level),
    ]
    if decision.suite_checks:
        lines += ["", "| suite | result | bar | |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['suite']} | {c['value'] if c['value'] is not None else 'not run'} | {c['bar']:g} | {'pass' if c['passed'] else 'FAIL'} |" for c in decision.suite_checks]
    lines += ["", "## Reasons", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    if plot or slice_plots:
        lines += ["", "## Plots", ""]
        if plot:
            lines += [f"![every slice: delta with its interval]({plot})", ""]
        for name, target in (slice_plots or {}).items():
            lines += [
                f"### {name}",
                "",
                f"![{name}: means and delta with its interval]({target})",
                "",
            ]
        lines.pop()
    lines += ["", "## Method", "", _method_text(decision), ""]
    return "\n".join(lines)


def render_report_html(
    decision: GateDecision,
    title: str = "Eval gate",
    *,
    plot: bytes | None = None,
    slice_plots: Mapping[str, bytes] | None = None,
) -> str:
    """The report as one self-contained HTML page: the PNGs are embedded (data URIs), so a
    single link (a file, a presigned S3 URL) shows everything."""
    import base64
    from html import escape

    def image(png: bytes, alt: str) -> str:
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'

    verdict = "PROMOTE" if decision.promote else "REJECT"
    level = f"{decision.ci_level * 100:g}%"
    rows = []
    for name, row in decision.slices.items():
        result = "pass" if row["passed"] else "FAIL"
        rows.append(
            f'<tr class="{result.lower()}"><td>{escape(name)}</td><td>{escape(row["rule"])}</td>'
            f'<td class="num">{row["n"]}</td><td class="num">{row["baseline_mean"]:.3f}</td>'
            f'<td class="num">{row["candidate_mean"]:.3f}</td><td class="num">{row["delta"]:+.3f}</td>'
            f'<td>[{row["ci_low"]:.3f}, {row["ci_high"]:.3f}]</td><td class="num">{row["p_value"]:.3g}</td>'
            f"<td>{result}</td></tr>"
        )
    for name in decision.improve_slices:
        if name not in decision.slices:
            rows.append(
                f'<tr class="fail"><td>{escape(name)}</td><td>improve</td><td class="num">0</td>'
                "<td>-</td><td>-</td><td>-</td><td>-</td><td>-</td><td>FAIL (no rows)</td></tr>"
            )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em}"
        ".num{text-align:right}tr.fail td{background:#fde8e8}tr.pass td{background:#eaf7ea}"
        ".verdict{font-size:1.2em}img{max-width:100%}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="verdict"><strong>Decision: {verdict}</strong> ({escape(_parameters_text(decision))})</p>',
        "<table><thead><tr><th>slice</th><th>rule</th><th>n</th><th>baseline</th><th>candidate</th>"
        f"<th>delta</th><th>{level} CI</th><th>p (improvement)</th><th>result</th></tr></thead>",
        "<tbody>",
        *rows,
        "</tbody></table>",
        "<h2>Reasons</h2><ul>",
        *(f"<li>{escape(reason)}</li>" for reason in decision.reasons),
        "</ul>",
    ]
    if plot or slice_plots:
        parts.append("<h2>Plots</h2>")
        if plot:
            parts.append(f"<p>{image(plot, 'every slice: delta with its interval')}</p>")
        for name, png in (slice_plots or {}).items():
            parts.append(
                f"<h3>{escape(name)}</h3><p>{image(png, name + ': means and delta with its interval')}</p>"
            )
    parts += ["<h2>Method</h2>", f"<p>{escape(_method_text(decision))}</p>", "</body></html>", ""]
    return "\n".join(parts)


@dataclass(frozen=True)


class ReportFiles:
    """The files of one gate report, as written by :func:`write_report` (names relative to
    its directory, so the Markdown's image links work wherever the directory is copied)."""

    markdown: str
    html: str
    plot: str
    slice_plots: dict[str, str]

    def names(self) -> list[str]:
        return [self.markdown, self.html, self.plot, *self.slice_plots.values()]


def slice_plot_name(name: str) -> str:
    """A file name for the slice's plot (safe characters; distinct slices stay distinct)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slice"
    if safe != name:
        safe = f"{safe}-{zlib.crc32(name.encode('utf-8')):08x}"
    return f"gate-{safe}.png"


def write_report(
    decision: GateDecision, directory: str | os.PathLike[str], *, title: str = "Eval gate"
) -> ReportFiles:
    """Write the whole report into ``directory``: ``gate.png`` (every slice), one
    ``gate-<slice>.png`` per slice, ``gate.md`` (links them) and ``gate.html`` (embeds them)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        markdown="gate.md",
        html="gate.html",
        plot="gate.png",
        slice_plots={name: slice_plot_name(name) for name in decision.slices},
    )
    plot_decision(decision, out / files.plot)
    for name, file_name in files.slice_plots.items():
        plot_slice(decision, name, out / file_name)
    (out / files.markdown).write_text(
        render_report_markdown(decision, title, plot=files.plot, slice_plots=files.slice_plots),
        encoding="utf-8",
    )
    (out / files.html).write_text(
        render_report_html(
            decision,
            title,
            plot=(out / files.plot).read_bytes(),
            slice_plots={name: (out / f).read_bytes() for name, f in files.slice_plots.items()},
        ),
        encoding="utf-8",
    )
    return files


def plot_decision(decision: GateDecision, path: str | os.PathLike[str]) -> Path:
    """Write a PNG: per slice, delta with its CI as an error bar, lines at 0 and -margin."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(decision.slices)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.55 * max(len(names), 1)))
    try:
        for row_index, name in enumerate(names):
            row = decision.slices[name]
            color = "tab:green" if row["passed"] else "tab:red"
            ax.errorbar(
                row["delta"],
                row_index,
                xerr=[[row["delta"] - row["ci_low"]], [row["ci_high"] - row["delta"]]],
                fmt="o",
                color=color,
                capsize=4,
            )
        ax.axvline(0.0, color="black", linewidth=1)
        ax.axvline(
            -decision.margin,
            color="tab:orange",
            linestyle="--",
            linewidth=1,
            label=f"-margin ({-decision.margin:g})",
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [f"{n} ({decision.slices[n]['rule']}, n={decision.slices[n]['n']})" for n in names]
        )
        ax.set_ylim(-0.7, max(len(names), 1) - 0.3)
        ax.invert_yaxis()
        ax.set_xlabel(f"candidate - baseline (mean, {decision.ci_level * 100:g}% bootstrap CI)")
        verdict = "PROMOTE" if decision.promote else "REJECT"
        ax.set_title(f"Eval gate: {verdict}")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def plot_slice(decision: GateDecision, name: str, path: str | os.PathLike[str]) -> Path:
    """Write a PNG for one slice: left, the baseline's and the candidate's mean score; right,
    the paired delta with its CI against the slice's rule (above 0 to improve, above -margin
    to be non-inferior), the passing side shaded."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    row = decision.slices[name]
    passed, improve = bool(row["passed"]), row["rule"] == "improve"
    color = "tab:green" if passed else "tab:red"
    threshold = 0.0 if improve else -decision.margin
    fig, (means_ax, delta_ax) = plt.subplots(
        1, 2, figsize=(7.5, 2.2), gridspec_kw={"width_ratios": [1, 1.6]}
    )
    try:
        means = [row["baseline_mean"], row["candidate_mean"]]
        bars = means_ax.barh([1, 0], means, color=["tab:gray", color], height=0.6)
        means_ax.set_yticks([1, 0], ["baseline", "candidate"])
        means_ax.set_xlim(0, 1.18)
        means_ax.set_xlabel("mean score")
        for bar, value in zip(bars, means, strict=True):
            means_ax.text(
                value + 0.02,
                bar.get_y() + bar.get_height() / 2,
                f"{value:.3f}",
                va="center",
                fontsize="small",
            )

        low, high, delta = row["ci_low"], row["ci_high"], row["delta"]
        span = max(abs(low), abs(high), abs(threshold), 0.05) * 1.3
        delta_ax.axvspan(threshold, span, color="tab:green", alpha=0.08, label="passing side")
        delta_ax.errorbar(
            delta, 0, xerr=[[delta - low], [high - delta]], fmt="o", color=color, capsize=5
        )
        delta_ax.axvline(0.0, color="black", linewidth=1)
        if not improve:
            delta_ax.axvline(
                threshold,
                color="tab:orange",
                linestyle="--",
                linewidth=1,
                label=f"-margin ({threshold:g})",
            )
        delta_ax.set_xlim(-span, span)
        delta_ax.set_yticks([])
        delta_ax.set_xlabel(f"candidate - baseline ({decision.ci_level * 100:g}% CI)")
        delta_ax.legend(loc="upper left", fontsize="x-small")
        verdict = "pass" if passed else "FAIL"
        p_text = f", p={row['p_value']:.3g}" if improve else ""
        fig.suptitle(
            f"{name}: {row['rule'].replace('_', '-')}, n={row['n']}, delta {delta:+.3f} "
            f"[{low:.3f}, {high:.3f}]{p_text}: {verdict}",
            fontsize="medium",
        )
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out
