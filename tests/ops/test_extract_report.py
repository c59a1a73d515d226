"""extract --report FILE.html: one self-contained page, its numbers those of the JSON report.

Oracles: extract's own --json report (the page must say the same), the spectrum's energy (the kept
singular values' squares over ||delta||_F^2 must give the reported energy kept), the auto rule's cut
(exactly the kept values lie above it), and headless Chromium, which must draw the charts.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy
import pytest
import torch
from click.testing import CliRunner

from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import is_unfinished
from adaptertool.ops.examples import LlamaShape, write_llama, write_lora_adapter
from adaptertool.ops.extract import ExtractConfig, extract
from adaptertool.ops.merge import MergeConfig, merge

# Wide enough that the randomized SVD runs (the sketch spans under 30 % of 128) and bf16 noise has an edge.
SHAPE = LlamaShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=96)
TARGETS = ("q_proj", "v_proj", "down_proj")
CHART_COLOURS = {"kept": (0x1F, 0x5F, 0xBF), "energy": (0x2A, 0x9D, 0x3F), "chosen rank": (0xD6, 0x27, 0x28)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 base and its merge with a rank-6 LoRA on three projections (bf16, so rounding noise too)."""
    root = tmp_path_factory.mktemp("report")
    write_llama(root / "base", SHAPE, dtype=torch.bfloat16)
    write_lora_adapter(root / "adapter", SHAPE, rank=6, targets=TARGETS)
    merge(MergeConfig(base=root / "base", adapters=((root / "adapter", 1.0),), out=root / "tuned"))
    return {"base": root / "base", "tuned": root / "tuned"}


class _Page(HTMLParser):
    """What a test needs of the page: sections, rank marks, reference lines, the data block, every URL."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[dict[str, str]] = []  # module and group sections, with their data-* attributes
        self.marks: list[tuple[str, dict[str, str]]] = []  # (section, attributes) of each chart's rank mark
        self.refs: list[tuple[str, dict[str, str]]] = []  # (section, attributes) of every reference line
        self.text: dict[str, str] = {}  # section -> its visible text
        self.urls: list[str] = []
        self.data = ""
        self._in_data = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.urls += [v for k, v in a.items() if k in ("src", "href", "srcset", "action", "poster", "data")]
        if tag == "section":
            self.sections.append(a)
            self.text[a["id"]] = ""
        elif tag == "g" and "ref" in a.get("class", "").split():
            self.refs.append((self.sections[-1]["id"], a))
            if "chosen-rank" in a["class"].split():
                self.marks.append((self.sections[-1]["id"], a))
        self._in_data = tag == "script" and a.get("id") == "extract-data"

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data += data
        elif self.sections:
            self.text[self.sections[-1]["id"]] += data

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False


def _cli(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["extract", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_page_holds_each_module_with_the_json_reports_numbers(models: dict[str, Path], tmp_path: Path) -> None:
    report = _cli(str(models["base"]), str(models["tuned"]), str(tmp_path / "ad"), "--rank", "4",
                  "--report", str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    page = _Page(text)
    data = json.loads(page.data)
    assert data["report"] == report  # the whole JSON report, for scripts
    assert [s["data-module"] for s in page.sections] == [m["module"] for m in report["modules"]]
    assert len(report["modules"]) == 2 * len(TARGETS) and report["rel_error"] > 0.01  # rank 4 of a rank-6 change
    for section, m in zip(page.sections, report["modules"]):
        assert (int(section["data-rank"]), float(section["data-retained"]), float(section["data-rel-error"])) == (
            m["rank"], m["retained"], m["rel_error"])
        shown = page.text[section["id"]]
        assert f"rank {m['rank']}" in shown and f"{m['retained']:.4f}" in shown and f"{m['rel_error']:.4f}" in shown
        # Both charts mark the chosen rank and say which rule chose it.
        assert [a["data-rank"] for s, a in page.marks if s == section["id"]] == [str(m["rank"])] * 2
        assert {a["data-rule"] for s, a in page.marks if s == section["id"]} == {"rank"}
        values = data["spectra"][m["module"]]["values"]
        assert values == sorted(values, reverse=True)
        kept = sum(v * v for v in values[: m["rank"]]) / m["delta_norm"] ** 2
        assert kept == pytest.approx(m["retained"], rel=1e-4)
        # The page says how much of the spectrum it has: all of it where the exact SVD ran (v_proj's
        # 64-wide sketch would span 30 % of the matrix), else the randomized sketch's rank + oversample.
        if len(values) == min(m["shape"]):
            assert f"All {len(values)} singular values (exact SVD)" in shown
        else:
            assert len(values) == m["rank"] + 16 and f"σ1-σ{len(values)} of {min(m['shape'])} computed" in shown
    # Self-contained: no URL but in-page anchors, nothing the page could fetch.
    assert page.urls and all(url.startswith("#") for url in page.urls)
    assert not re.search(r"https?:|//[\w.-]+/|@import|url\(", text)
    assert not [p.name for p in tmp_path.iterdir() if is_unfinished(p.name)]  # no temporary file left


@pytest.mark.parametrize("rule", ["energy", "auto"])
def test_energy_target_and_auto_rank_cut_are_marked(models: dict[str, Path], tmp_path: Path, rule: str) -> None:
    options = {"energy": 0.8} if rule == "energy" else {"auto_rank": True}
    report = extract(ExtractConfig(base=models["base"], tuned=models["tuned"], out=tmp_path / "ad", report=tmp_path / "r.html",
                                   **options))
    page = _Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    spectra = json.loads(page.data)["spectra"]
    assert len(page.sections) == len(report.modules)
    for section, m in zip(page.sections, report.modules):
        assert {(a["data-rank"], a["data-rule"]) for s, a in page.marks if s == section["id"]} == {(str(m.rank), rule)}
        lines = {a["class"].split()[1]: a for s, a in page.refs if s == section["id"]}
        values = spectra[m.module]["values"]
        if rule == "energy":
            assert "target" in lines and "target 0.8" in (tmp_path / "r.html").read_text(encoding="utf-8")
            energy = [sum(v * v for v in values[:r]) / m.delta_norm**2 for r in (m.rank - 1, m.rank)]
            assert energy[0] < 0.8 + 1e-6 and energy[1] > 0.8 - 1e-6  # the smallest rank reaching the target
        else:
            cut = float(lines["cut"]["data-threshold"])
            assert cut == spectra[m.module]["threshold"]
            assert sum(v > cut for v in values) == m.rank == 6  # the planted rank rises above the noise


def test_experts_get_one_section_per_group_with_every_expert(moe_fixtures: Path, tmp_path: Path) -> None:
    family = moe_fixtures / "qwen3_moe"
    for form, tuned in (("per-expert", "per-expert"), ("fused", "tp")):
        out = tmp_path / form
        report = _cli(str(family / "fused"), str(family / "oracles" / tuned), str(out), "--experts", form, "--rank", "2",
                      "--report", str(out.with_suffix(".html")))
        page = _Page(out.with_suffix(".html").read_text(encoding="utf-8"))
        groups = [s["data-group"] for s in page.sections if "data-group" in s]
        assert groups == [g["group"] for g in report["expert_groups"]] and groups
        assert [s["data-module"] for s in page.sections if "data-module" in s] == [
            m["module"] for m in report["modules"] if m["group"] is None]
        text = out.with_suffix(".html").read_text(encoding="utf-8")
        experts = [(m["expert"], m["rank"], m["retained"], m["rel_error"]) for m in report["modules"] if m["group"]]
        shown = [(int(e), int(r), float(kept), float(err)) for e, r, kept, err in
                 re.findall(r'<tr data-expert="(\d+)" data-rank="(\d+)" data-retained="([^"]+)" data-rel-error="([^"]+)"',
                            text)]
        assert sorted(shown) == sorted(experts)


def test_report_paths_that_clash_are_refused_before_any_work(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ad"
    for report, message in ((models["tuned"], "overlaps input"), (models["base"] / "r.html", "overlaps input"),
                            (out, "is OUT itself"), (tmp_path, "is a folder")):
        with pytest.raises(AdapterToolError, match=message):
            extract(ExtractConfig(base=models["base"], tuned=models["tuned"], out=out, report=report))
        assert not out.exists()
    result = CliRunner().invoke(cli, ["extract", str(models["base"]), str(models["tuned"]), str(out),
                                      "--report", str(models["tuned"] / "model.safetensors")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "overlaps input" in result.stderr


def test_json_report_is_the_json_output_and_replaces_an_old_one(models: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("an older report", encoding="utf-8")
    report = _cli(str(models["base"]), str(models["tuned"]), str(tmp_path / "ad"), "--rank", "2",
                  "--report", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == report
    assert not [p.name for p in tmp_path.iterdir() if is_unfinished(p.name)]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_headless_chromium_draws_the_charts(models: dict[str, Path], tmp_path: Path) -> None:
    extract(ExtractConfig(base=models["base"], tuned=models["tuned"], out=tmp_path / "ad", rank=4, report=tmp_path / "r.html"))
    shot = tmp_path / "shot.png"
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,900",
                           (tmp_path / "r.html").as_uri()], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = _png_rgb(shot)
    assert pixels.shape[:2] == (900, 1000)
    assert len(numpy.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and charts, not a blank page
    for what, colour in CHART_COLOURS.items():  # each chart element drawn in its colour, anti-aliasing aside
        near = (numpy.abs(pixels.astype(int) - colour).sum(axis=2) < 40).sum()
        assert near > 30, f"no {what} pixels in the screenshot"


def _png_rgb(path: Path) -> numpy.ndarray:
    """(height, width, 3) uint8 pixels of an 8-bit RGB or RGBA non-interlaced PNG (Chromium's screenshots)."""
    data = path.read_bytes()
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and interlace == 0, "an unexpected PNG layout"
    step = 3 if colour == 2 else 4
    raw = zlib.decompress(chunks[b"IDAT"])
    rows, above = [], bytearray(width * step)
    for y in range(height):
        kind, line = raw[y * (width * step + 1)], bytearray(raw[y * (width * step + 1) + 1 : (y + 1) * (width * step + 1)])
        for i in range(len(line)) if kind else ():  # undo the row's filter (PNG spec, section 9)
            left = line[i - step] if i >= step else 0
            up, corner = above[i], above[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            else:
                guess = left + up - corner
                near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner))[2]
                line[i] = (line[i] + near) & 255
        rows.append(bytes(line))
        above = line
    return numpy.frombuffer(b"".join(rows), dtype=numpy.uint8).reshape(height, width, step)[:, :, :3]
