"""The page around the sections: one HTML file with its styles inline, no script, no font or
image fetched, readable offline and printable."""

from __future__ import annotations

from html import escape

from llmctl.report.common import Section

# Colour classes s0..s5 (Okabe-Ito, distinguishable with colour blindness) for lines, dots, bars.
_PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9"]

CSS = (
    'body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#111;background:#fff;'
    "max-width:64em;margin:1.5em auto;padding:0 1em;line-height:1.45}"
    "h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.15em;margin-top:1.6em}"
    "nav a{margin-right:.9em}nav a.empty{color:#999}"
    'code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}'
    "table{border-collapse:collapse;margin:.5em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}"
    "table.kv th{background:#f6f6f6;font-weight:600}"
    "figure{margin:.8em 0}figcaption{font-weight:600;margin-bottom:.2em}"
    "svg.chart{width:100%;height:auto;max-width:760px;display:block;font-size:11px}svg.compact{max-width:380px}"
    ".tick{fill:#333}.small{font-size:9px}.axlabel{fill:#111;font-size:12px}.axis{stroke:#444}.grid{stroke:#e5e5e5}"
    "polyline{fill:none;stroke-width:1.8}polyline.dotted{stroke-dasharray:5 3;stroke-width:1.4}"
    "circle.hit{fill-opacity:0;stroke:none}circle.hit:hover{fill-opacity:1}"
    ".mk line{stroke:#777;stroke-dasharray:3 3}.mk.resume line{stroke:#b00;stroke-dasharray:none}"
    ".mklabel{font-size:9px;fill:#555}.mk.resume .mklabel{fill:#b00}"
    ".legend{display:flex;flex-wrap:wrap;gap:.3em 1.2em;font-size:.9em;margin:.2em 0 .6em}"
    ".key i{display:inline-block;width:1.6em;height:.35em;margin-right:.35em;vertical-align:middle}"
    ".scale{display:inline-block;width:10em;height:.9em;border:1px solid #ccc;vertical-align:middle}"
    "rect.neg{fill:#d6604d}"
    ".empty-section{border:2px dashed #bbb;background:#fafafa;padding:.6em 1em;color:#444}"
    ".note{color:#444;font-size:.92em}"
    "pre.tokens{white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.9;margin:.2em 0;padding:.4em;border:1px solid #ddd;border-radius:4px}"
    "pre.prompt{background:#f3f6fa;margin:.2em 0;padding:.4em;white-space:pre-wrap}"
    ".tok,.t{border-radius:2px;padding:1px 0;box-shadow:inset 0 0 0 1px rgba(0,0,0,.06)}.tgt{text-decoration:underline}"
    ".sample{margin:.6em 0 1.2em}.meta{font-size:.85em;color:#555;margin:0}"
    ".rail{background:#ffe08a;padding:0 .4em;border-radius:3px}"
    ".pass{color:#0a6b2d;font-weight:700}.fail{color:#b00020;font-weight:700}"
    "table.hard td:last-child{min-width:26em}"
    ".cols{display:grid;grid-template-columns:repeat(auto-fill,minmax(22em,1fr));gap:0 1.5em}"
    ".swatch{padding:1px 6px;border-radius:3px}"
    "@media print{nav{display:none}h2{break-after:avoid}figure,table{break-inside:avoid}}"
)
for _i, _c in enumerate(_PALETTE):
    CSS += f".s{_i} polyline{{stroke:{_c}}}.s{_i} circle{{fill:{_c}}}rect.s{_i}{{fill:{_c}}}.key.s{_i} i{{background:{_c}}}.axlabel.right{{fill:#333}}"


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.key}"{" class=empty" if not s.body else ""}>{escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        inner = s.body or f'<p class="empty-section" data-empty="1">Nothing to show: {escape(s.missing)}.</p>'
        body.append(f'<section id="{s.key}" data-section="{s.key}"><h2>{escape(s.title)}</h2>{inner}</section>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        # Nothing may be fetched: no external or inline-injected resource, even by accident.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p>{escape(subtitle)}</p><nav>{nav}</nav>{''.join(body)}</body></html>"
    )
