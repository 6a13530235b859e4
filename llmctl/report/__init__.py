"""`llmctl report CONFIG|RUN`: one self-contained HTML page about a run, RUN/report.html.

It reads only the run directory (manifests and the files each stage writes) and loads no
model: training curves, the data report, eval metrics against baselines and thresholds,
samples coloured by surprisal, exports, explain results and lineage. A stage that has not run
is a section marked empty, naming the command that fills it.

  svg.py        the charts, as SVG text
  common.py     reading run files, tables, surprisal colours
  training.py data.py evaluation.py samples.py lineage.py   one module per part of the page
  page.py       the HTML shell and its inline styles
"""

from __future__ import annotations

import time
from pathlib import Path

from llmctl.errors import StageInputError
from llmctl.report.data import data_section
from llmctl.report.evaluation import eval_section
from llmctl.report.lineage import export_section, lineage_section
from llmctl.report.page import render_page
from llmctl.report.samples import explain_section, samples_section
from llmctl.report.training import training_section
from llmctl.rundir import STAGE_ORDER, RunDir, atomic_write_text


def sections(rd: RunDir, cfg=None) -> list:
    """The page's sections. `cfg` (the config the user gave, else the one eval recorded) sets the thresholds."""
    if cfg is None:
        cfg = _recorded_config(rd)
    return [data_section(rd), training_section(rd), eval_section(rd, cfg), samples_section(rd), export_section(rd),
            explain_section(rd), lineage_section(rd)]


def write(rd: RunDir, cfg=None) -> dict:
    """Write RUN/report.html (atomically); {path, bytes, sections shown, sections empty}."""
    if not any(rd.manifest(s) for s in (*STAGE_ORDER, "explain")):
        raise StageInputError(f"{rd.root} holds no stage output (no manifest.json in {', '.join(STAGE_ORDER)}): "
                              "run 'llmctl run CONFIG' (or 'llmctl prepare CONFIG') first")
    parts = sections(rd, cfg)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page = render_page(f"llmctl report: {rd.root.name}", f"{rd.root.resolve()} (written {when})", parts)
    path = rd.report_html_path
    atomic_write_text(path, page)
    return {"report": str(path), "bytes": len(page.encode("utf-8")),
            "sections": [s.key for s in parts if s.body], "empty_sections": {s.key: s.missing for s in parts if not s.body}}


def _recorded_config(rd: RunDir):
    from llmctl.config import load_config
    from llmctl.errors import LlmctlError

    for stage in ("eval", "train", "prepare"):
        p = rd.stage_dir(stage) / "config.yaml"
        if p.is_file():
            try:
                return load_config(Path(p))
            except (LlmctlError, OSError):
                continue
    return None
