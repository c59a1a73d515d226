"""extract's --report file: the report as JSON or, for a name ending in .html, one self-contained page.

The page opens with no network: inline CSS, inline SVG charts (:mod:`adaptertool.ops.report_svg`)
and a few lines of inline script that sort the summary table. It holds the rank rule, the totals and
notes, a summary table (module, rank, energy kept, relative error), then, under one heading per layer,
one section per extracted module with two charts: the singular values its SVD computed (log scale), and the share of
``||delta||_F^2`` that the first i of them hold, with the chosen rank marked and, where a rule chose
it, the --energy target or the --auto-rank cut. Experts get one section per group (layer and
projection, or fused parameter): the spread of their spectra (min-max band and median) and a table
of every expert. A JSON block (``<script type="application/json" id="extract-data">``) holds the
whole JSON report and the spectra, for scripts.

The spectra cost nothing: they are the singular values extract's SVDs computed anyway, kept only when
a page is asked for. A randomized SVD computes rank + oversample of them (estimates, each at most the
true value); the energy past them is ``||delta||_F^2`` less theirs, which the page states.
Pure rendering apart from :func:`write_report`, which stages the file (:func:`adaptertool.io.staged_file`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.adapters.peft_keys import module_order
from adaptertool.adapters.svd import RankPolicy
from adaptertool.errors import OutputError
from adaptertool.io import check_output, staged_file
from adaptertool.ops.report_svg import Chart, Line, Ref, chart_svg

if TYPE_CHECKING:  # extract imports this module; the types are only named here
    from adaptertool.ops.extract import ExtractReport, ModuleReport
    from adaptertool.ops.extract_experts import ExpertGroupReport

__all__ = ["Spectrum", "check_report_path", "render_html", "spectrum_key", "wants_html", "write_report"]

_HTML_SUFFIXES = (".html", ".htm")
_LAYER = re.compile(r"(.*?\.\d+)(?:\.|$)")  # a module name up to its first number: [model.layers.3].mlp.up_proj
_OTHERS = "other modules"  # those outside the numbered layers (lm_head), listed last
_MIN_SHOWN = 64  # singular values drawn at least (when computed), else 4x the largest rank: the knee stays visible


@dataclass(frozen=True)
class Spectrum:
    """The singular values one module's SVD computed, descending, and the --auto-rank cut applied to them."""

    values: list[float]
    threshold: float | None = None


def wants_html(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() in _HTML_SUFFIXES


def spectrum_key(module: str, expert: int | None, group: str | None) -> str:
    """The name extract seeds a module's SVD with, which keys its spectrum: the module, or for an
    expert of a fused parameter (``group == module``) the parameter's path and the expert's number."""
    return f"{module}.{expert}" if group == module else module


def check_report_path(report: Path, *, out: Path, inputs: Sequence[Path]) -> None:
    """Refuse a report path that is OUT or a folder, or is or lies inside an input (an existing report
    file is replaced, as the JSON report always was).

    Raises:
        AdapterToolError: naming the path and what to choose instead.
    """
    check_output(report, force=True, inputs=inputs)
    if report.resolve() == out.resolve():
        raise OutputError(f"--report {report} is OUT itself; choose another file for the report")
    if report.is_dir():
        raise OutputError(f"--report {report} is a folder; name a file, e.g. {report / 'report.html'}")


def write_report(path: Path, report: ExtractReport, spectra: dict[str, Spectrum] | None, *, policy: RankPolicy,
                 inputs: Sequence[Path]) -> None:
    """Write ``report`` to ``path`` atomically (replacing an older report): the page when
    :func:`wants_html`, else JSON."""
    if wants_html(path):
        text = render_html(report, spectra or {}, policy=policy)
    else:
        text = json.dumps(asdict(report), indent=2) + "\n"
    with staged_file(path, force=True, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")


def render_html(report: ExtractReport, spectra: dict[str, Spectrum], *, policy: RankPolicy) -> str:
    """The report page (see the module docstring); ``spectra`` keyed by :func:`spectrum_key`."""
    single = [m for m in report.modules if m.group is None]
    members: dict[str, list[ModuleReport]] = {}
    for m in report.modules:
        if m.group is not None:
            members.setdefault(m.group, []).append(m)
    rows = [_module_row(i, m) for i, m in enumerate(single)]
    rows += [_group_row(i, g, members.get(g.group, [])) for i, g in enumerate(report.expert_groups)]
    # Cards under one heading per layer (the name up to its first number), in model order.
    blocks: dict[str, list[str]] = {}
    for i, m in enumerate(single):
        section = _module_section(i, m, spectra.get(spectrum_key(m.module, m.expert, m.group)), policy)
        blocks.setdefault(_layer(m.module), []).append(section)
    for i, g in enumerate(report.expert_groups):
        blocks.setdefault(_layer(g.group), []).append(_group_section(i, g, members.get(g.group, []), spectra, policy))
    sections = [f"<h2>{escape(layer)}</h2><div class=\"cards\">{''.join(cards)}</div>"
                for layer, cards in sorted(blocks.items(), key=lambda item: (item[0] == _OTHERS, module_order(item[0])))]
    data = {"report": asdict(report),
            "spectra": {key: {"values": [float(f"{v:.7g}") for v in s.values], "threshold": s.threshold}
                        for key, s in spectra.items()}}
    # "<" escaped: a module name read from a checkpoint must not be able to close the script element.
    block = json.dumps(data).replace("<", "\\u003c")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>extract report: {escape(report.out)}</title><style>{_CSS}</style></head><body>",
        f"<h1>extract report: {escape(report.out)}</h1>", _overview(report, policy),
        "<div class=\"scroll\"><table class=\"summary sortable\"><thead><tr><th>module</th><th>shape</th><th>rank</th>"
        "<th>energy kept</th><th>rel. error</th><th>noise floor</th><th>note</th></tr></thead><tbody>", *rows,
        "</tbody></table></div>", *sections,
        f"<script type=\"application/json\" id=\"extract-data\">{block}</script>",
        f"<script>{_SORT_JS}</script></body></html>\n",
    ])


def _layer(module: str) -> str:
    found = _LAYER.match(module)
    return found.group(1) if found else _OTHERS


def _overview(r: ExtractReport, policy: RankPolicy) -> str:
    norms = (f"; {len(r.norms)} changed norm modules saved whole" if r.norms else "")
    saved = [m for m in r.modules_to_save if m not in {n.module for n in r.norms}]
    items = [
        f"<b>rank rule</b>: {escape(_rule(policy))}; adapter <code>r</code> = {r.rank} ({escape(r.svd)} SVD on {escape(r.device)})",
        f"<b>whole model</b>: energy kept {r.retained:.4f}, relative error {r.rel_error:.4f}, noise floor {r.noise_floor:.4f} "
        f"over {len(r.modules)} LoRAs; {len(r.unchanged)} unchanged modules skipped{norms}",
        f"<b>size</b>: adapter {r.adapter_bytes:,} bytes vs dense delta {r.delta_bytes:,} bytes",
        *([f"<b>saved whole</b>: {escape(', '.join(saved))}"] if saved else []),
        *(f"<b>note</b>: {escape(note)}" for note in r.notes),
    ]
    return ("<ul class=\"overview\">" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"
            "<p class=\"help\">Energy kept: Σ σ<sub>i</sub>² over the kept rank / ‖Δ‖<sub>F</sub>²; relative error: "
            "‖Δ − BA‖<sub>F</sub> / ‖Δ‖<sub>F</sub>; noise floor: the part of that error that 16-bit rounding of "
            "TUNED alone leaves (an estimate). Click a column to sort.</p>")


def _rule(policy: RankPolicy) -> str:
    cap = f", at most {policy.ceiling}" if policy.adaptive or policy.max_rank is not None else ""
    if policy.energy is not None:
        rule = f"--energy {policy.energy:g}: per module the smallest rank keeping {policy.energy:g} of ‖Δ‖F²"
    elif policy.auto:
        rule = ("--auto-rank: per module the singular values above 1.1 x the rounding-noise edge of TUNED "
                "(or float32 SVD resolution)")
    else:
        rule = f"--rank {policy.rank}: the same rank everywhere"
    return rule + cap + " and below each module's break-even size"


def _cell(value: float, text: str) -> str:
    return f"<td data-value=\"{value!r}\">{text}</td>"


def _flags(m: ModuleReport) -> str:
    return ("capped at the break-even size" if m.size_capped else "capped by --max-rank" if m.capped else "") + (
        " +bias" if m.bias else "")


def _module_row(i: int, m: ModuleReport) -> str:
    return (f"<tr><td><a href=\"#m{i}\">{escape(m.module)}</a></td><td>{m.shape[0]}x{m.shape[1]}</td>"
            f"{_cell(m.rank, str(m.rank))}{_cell(m.retained, f'{m.retained:.4f}')}{_cell(m.rel_error, f'{m.rel_error:.4f}')}"
            f"{_cell(m.noise_floor, f'{m.noise_floor:.4f}')}<td>{_flags(m)}</td></tr>")


def _group_row(i: int, g: ExpertGroupReport, members: list[ModuleReport]) -> str:
    shape = f"{g.experts} x {members[0].shape[0]}x{members[0].shape[1]}" if members else f"{g.experts} experts"
    return (f"<tr><td><a href=\"#g{i}\">{escape(g.group)}</a></td><td>{shape}</td>{_cell(g.rank_max, _ranks(g))}"
            f"{_cell(g.retained, f'{g.retained:.4f}')}{_cell(g.rel_error, f'{g.rel_error:.4f}')}<td></td>"
            f"<td>{g.changed} of {g.experts} experts changed</td></tr>")


def _ranks(g: ExpertGroupReport) -> str:
    return str(g.rank_min) if g.rank_min == g.rank_max else f"{g.rank_min}-{g.rank_max}"


def _module_section(i: int, m: ModuleReport, spectrum: Spectrum | None, policy: RankPolicy) -> str:
    figures = (f"rank {m.rank} · energy kept {m.retained:.4f} · rel. error {m.rel_error:.4f} · noise floor "
               f"{m.noise_floor:.4f} · ‖Δ‖<sub>F</sub> {m.delta_norm:.4g}")
    flags = f" · {_flags(m)}" if _flags(m) else ""
    head = (f"<section class=\"module\" id=\"m{i}\" data-module=\"{escape(m.module)}\" data-rank=\"{m.rank}\" "
            f"data-retained=\"{m.retained!r}\" data-rel-error=\"{m.rel_error!r}\"><h3>{escape(m.module)}</h3>"
            f"<p>{m.shape[0]}x{m.shape[1]} · {figures}{flags}</p>")
    if spectrum is None:  # only the bias changed: no SVD ran
        return head + "<p class=\"help\">The weight did not change: a rank-1 zero update carries the changed bias.</p></section>"
    body = _charts([spectrum], [m.delta_norm], [m.rank], policy, [m.retained])
    return head + body + f"<p class=\"help\">{_computed(m.shape, [spectrum], [m.delta_norm], [m.rank])}</p></section>"


def _group_section(i: int, g: ExpertGroupReport, members: list[ModuleReport], spectra: dict[str, Spectrum],
                   policy: RankPolicy) -> str:
    moved = [m for m in members if m.delta_norm > 0]
    found = [(m, spectra[spectrum_key(m.module, m.expert, m.group)]) for m in moved
             if spectrum_key(m.module, m.expert, m.group) in spectra]
    parts = [f"<section class=\"group\" id=\"g{i}\" data-group=\"{escape(g.group)}\"><h3>{escape(g.group)}</h3>",
             f"<p>{g.changed} of {g.experts} experts changed · rank {_ranks(g)} · energy kept {g.retained:.4f} · "
             f"rel. error {g.rel_error:.4f} (energy-weighted over the group)</p>"]
    if found:
        spectra_found, norms, ranks = [s for _, s in found], [m.delta_norm for m, _ in found], [m.rank for m, _ in found]
        parts.append(_charts(spectra_found, norms, ranks, policy, [m.retained for m, _ in found]))
        parts.append(f"<p class=\"help\">Band: the lowest to the highest expert at each index; line: their median. "
                     f"{_computed(found[0][0].shape, spectra_found, norms, ranks)}</p>")
    rows = "".join(f"<tr data-expert=\"{m.expert}\" data-rank=\"{m.rank}\" data-retained=\"{m.retained!r}\" "
                   f"data-rel-error=\"{m.rel_error!r}\"><td>{m.expert}</td><td>{escape(m.module)}</td><td>{m.rank}</td>"
                   f"<td>{m.retained:.4f}</td><td>{m.rel_error:.4f}</td><td>{_flags(m)}</td></tr>" for m in members)
    parts.append(f"<details><summary>every expert ({len(members)})</summary><table><thead><tr><th>expert</th>"
                 f"<th>module</th><th>rank</th><th>energy kept</th><th>rel. error</th><th>note</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table></details></section>")
    return "".join(parts)


def _charts(spectra: list[Spectrum], norms: list[float], ranks: list[int], policy: RankPolicy,
            retained: list[float]) -> str:
    """The spectrum and cumulative-energy charts of one module, or of a group's band and median."""
    shown = _shown(spectra, ranks)
    values = [s.values[:shown] for s in spectra]
    low, high = min(ranks), max(ranks)
    rule = "energy" if policy.energy is not None else "auto" if policy.auto else "rank"
    marks = [Ref(rank, vertical=True, label=label, css="chosen-rank", data={"rank": str(rank), "rule": rule})
             for rank, label in ([(low, f"r = {low}")] if low == high else [(low, f"r = {low}-{high}"), (high, "")])]
    cuts = [s.threshold for s in spectra if s.threshold is not None]
    cut = [Ref(statistics.median(cuts), vertical=False, label="cut: 1.1 x noise edge", css="cut",
               data={"threshold": repr(statistics.median(cuts))})] if cuts else []
    target = [Ref(policy.energy, vertical=False, label=f"target {policy.energy:g}", css="target")] \
        if policy.energy is not None else []
    # One module: the energy measured on its factors, at the chosen rank.
    dot = [((ranks[0], retained[0]), "chosen")] if len(spectra) == 1 else []
    x_range = (1.0, float(max(shown, 2)))
    spectrum_chart = Chart(title="singular values σᵢ (log scale)", x_label="i", y_label="σᵢ", x_range=x_range,
                           log_y=True, lines=_lines(values, high, "kept"), refs=[*marks, *cut])
    energy_chart = Chart(title="energy kept by the first i", x_label="i", y_label="share of ‖Δ‖²", x_range=x_range,
                         y_range=(0.0, 1.0), lines=_lines([_cumulative(v, n) for v, n in zip(values, norms)], high, "energy"),
                         dots=dot, refs=[*marks, *target])
    return f"<div class=\"charts\">{chart_svg(spectrum_chart)}{chart_svg(energy_chart)}</div>"


def _lines(curves: list[list[float]], rank: int, css: str) -> list[Line]:
    """One module's curve, or several's median over a min-max band; the kept part (up to ``rank``) in ``css``."""
    longest = max(len(c) for c in curves)
    columns = [[c[i] for c in curves if i < len(c)] for i in range(longest)]
    middle = [(i + 1, statistics.median(col)) for i, col in enumerate(columns)]
    band = [Line([(i + 1, min(col)) for i, col in enumerate(columns)], css,
                 upper=[(i + 1, max(col)) for i, col in enumerate(columns)])] if len(curves) > 1 else []
    return [*band, Line(middle, "rest"), Line(middle[:rank], css)]


def _cumulative(values: list[float], norm: float) -> list[float]:
    total, kept, out = norm**2, 0.0, []
    for v in values:
        kept += v * v
        out.append(min(1.0, kept / total) if total else 1.0)
    return out


def _shown(spectra: list[Spectrum], ranks: list[int]) -> int:
    """How many singular values the charts draw."""
    return min(max(len(s.values) for s in spectra), max(_MIN_SHOWN, 4 * max(ranks)))


def _computed(shape: list[int], spectra: list[Spectrum], norms: list[float], ranks: list[int]) -> str:
    """What the charts show of the spectrum, and how much energy lies past the values computed."""
    full, shown = min(shape), _shown(spectra, ranks)
    count = max(len(s.values) for s in spectra)
    drawn = f" The charts draw the first {shown}." if shown < count else ""
    if count >= full:
        return f"All {full} singular values (exact SVD).{drawn}"
    tail = max(1.0 - math.fsum(v * v for v in s.values) / n**2 if n else 0.0 for s, n in zip(spectra, norms))
    return (f"σ1-σ{count} of {full} computed by the randomized SVD (estimates, each at most the true value); the "
            f"other {full - count} hold at most {max(tail, 0.0):.2%} of ‖Δ‖<sub>F</sub>² (‖Δ‖<sub>F</sub>² less the "
            f"computed values' squares).{drawn}")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}h3{font-size:1em;margin:0 0 .2em}
code{background:#f2f2f2;padding:0 .2em}.help{color:#666;font-size:.9em}.overview li{margin:.2em 0}
table{border-collapse:collapse;font-size:.9em}td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}.scroll{max-height:24em;overflow:auto;display:inline-block}td[data-value]{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:1em}
section{border:1px solid #ddd;border-radius:4px;padding:.6em}section p{margin:.2em 0}
.charts{display:flex;gap:.5em}.chart{width:50%;height:auto}
.chart .title{font-size:11px;font-weight:600}.chart .tick,.chart .axis{font-size:9px;fill:#555}
.chart .frame{fill:#fcfcfc;stroke:#bbb}.chart .grid{stroke:#eee}
.chart .line{fill:none;stroke-width:1.6}.chart .rest{stroke:#aaa}.chart .kept{stroke:#1f5fbf}
.chart .energy{stroke:#2a9d3f}.chart .band{stroke:none;opacity:.25}.chart .band.kept{fill:#1f5fbf}
.chart .band.energy{fill:#2a9d3f}.chart .dot.chosen{fill:#d62728}
.chart .ref line{stroke-dasharray:4 3;stroke-width:1.2}.chart .ref text{font-size:9px}
.chart .chosen-rank line{stroke:#d62728}.chart .chosen-rank text{fill:#d62728}
.chart .cut line{stroke:#e07b00}.chart .cut text{fill:#e07b00}
.chart .target line{stroke:#7b3fb0}.chart .target text{fill:#7b3fb0}
"""

# Click a header to sort by that column (numbers by their data-value), again to reverse.
_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], down = th.dataset.order !== "up";
  th.dataset.order = down ? "up" : "down";
  const key = (row) => { const c = row.cells[col]; return c.dataset.value !== undefined ? Number(c.dataset.value) : c.textContent; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? 1 : -1))
    .forEach((row) => body.appendChild(row));
}));
"""
