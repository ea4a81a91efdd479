"""The atlas's HTML: model, layer, unit and comparison pages, rendered from the manifest's entries.

Every link and image is relative, so the site opens from the file system or any static host. Each page
names its way back to the root in `data-root`, which the search script uses for its links.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from typing import Any

from .._types import LayerInfo, ModelDetails
from ._plan import UnitKey, slug

Entry = dict[str, Any]


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def page(title: str, root: str, crumbs: Sequence[tuple[str, str]], body: str) -> str:
    trail = "".join(f'<a href="{_e(href)}">{_e(text)}</a>' for text, href in crumbs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="{root}atlas.css"></head>
<body data-root="{root}">
<header><span class="crumbs">{trail}</span>{search_box()}</header>
<h1>{_e(title)}</h1>
{body}
<script src="{root}search.js"></script><script src="{root}atlas.js"></script>
</body></html>
"""


def search_box() -> str:
    return ('<span><input id="search" type="search" placeholder="search units: class, layer, layer:channel" '
            'aria-label="search units"><ul id="results"></ul></span>')


def dominant(entry: Entry) -> dict[str, Any] | None:
    """The class that clearly dominates the unit's top photos, if one does: the top-1 class of at least two
    of them and of at least half, and of more than any other class."""
    classes = entry.get("classes") or []
    if not classes:
        return None
    labelled = sum(k["count"] for k in classes)
    top, runner_up = classes[0], classes[1]["count"] if len(classes) > 1 else 0
    return top if top["count"] >= 2 and 2 * top["count"] >= labelled and top["count"] > runner_up else None


def association(entry: Entry, *, short: bool = False) -> str:
    """The class association label: the dominant class with its share and mean top-1 probability, or, when
    no class dominates, that none does and which classes the top photos are (short: for a grid cell)."""
    classes = entry.get("classes") or []
    if not classes:
        return ""
    n = len(entry.get("top") or [])
    top = dominant(entry)
    if top is not None:
        share = f"{top['label']} ({top['count']}/{n})"
        return share if short else f"{share} · mean p {top.get('probability', float('nan')):.2f}"
    shown = 2 if short else 3
    names = ", ".join(k["label"] for k in classes[:shown])
    more = f" +{len(classes) - shown} more" if len(classes) > shown else ""
    return f"mixed: {names}{more}" if short else f"no dominant class · top photos are {names}{more}"


def _rf(layer: LayerInfo) -> str:
    rf = layer.receptive_field
    return "" if rf is None else f"{rf.size[0]}×{rf.size[1]} (jump {rf.jump[0]})"


def index_page(models: Sequence[tuple[ModelDetails, int]], compare: bool) -> str:
    rows = "".join(f'<li><a href="{slug(d.info.name)}/index.html">{_e(d.info.name)}</a> '
                   f'<span class="muted">{n} units · {_e(d.info.description)}</span></li>' for d, n in models)
    extra = '<p><a href="compare.html">Compare the models layer by layer</a> (same relative depth)</p>' \
        if compare else ""
    body = f"<p>Feature visualisations beside the dataset examples that excite each unit.</p><ul>{rows}</ul>{extra}"
    return page("ConvLens atlas", "", [("atlas", "index.html")], body)


def model_page(details: ModelDetails, mapped: dict[str, int], filters_file: str | None) -> str:
    m = details.info
    rows = []
    for layer in details.layers:
        name = _e(layer.name)
        if layer.name in mapped:
            name = f'<a href="{slug(layer.name)}/index.html">{name}</a> ({mapped[layer.name]} units)'
        rows.append(f'<tr class="{"mapped" if layer.name in mapped else ""}"><td>{name}</td><td>{_e(layer.type)}'
                    f'</td><td>{_e("×".join(map(str, layer.output_shape)))}</td><td>{_rf(layer)}</td></tr>')
    filters = f'<h2>First-layer filters</h2><img class="filters" src="{filters_file}" alt="first-layer filters">' \
        if filters_file else ""
    links = " ".join(f'<a href="{slug(name)}/index.html">{_e(name)}</a>' for name in mapped)
    body = (f'<p class="muted">{_e(m.description)} · input {m.input_size[0]}×{m.input_size[1]} · '
            f'{m.num_classes} classes · {m.parameter_count:,} parameters</p>'
            f'<p class="nav">Mapped layers: {links}</p>{filters}'
            '<h2>Layers</h2><table><tr><th>name</th><th>type</th><th>output (C×H×W)</th>'
            f'<th>receptive field</th></tr>{"".join(rows)}</table>')
    return page(m.name, "../", [("atlas", "../index.html"), (m.name, "index.html")], body)


def layer_page(details: ModelDetails, layer: LayerInfo, mapped: Sequence[str], entries: Sequence[Entry]) -> str:
    cells = []
    for e in entries:
        dead = e.get("dead")
        tag = '<span class="tag">dead</span> ' if dead else ""
        cells.append(f'<a class="cell{" dead" if dead else ""}" href="{e["channel"]}.html">'
                     f'<img src="img/{_e(e["fv"]["file"])}" alt="channel {e["channel"]}">'
                     f'{tag}<b>{e["channel"]}</b> <span class="muted">{_e(association(e, short=True))}</span></a>')
    i = list(mapped).index(layer.name)
    nav = []
    if i > 0:
        nav.append(f'<a href="../{slug(mapped[i - 1])}/index.html">← {_e(mapped[i - 1])}</a>')
    if i + 1 < len(mapped):
        nav.append(f'<a href="../{slug(mapped[i + 1])}/index.html">{_e(mapped[i + 1])} →</a>')
    m = details.info.name
    body = (f'<p class="muted">{_e(layer.type)} · output {_e("×".join(map(str, layer.output_shape)))} · '
            f'receptive field {_rf(layer)}</p><p class="nav">{"".join(nav)}</p>'
            f'<div class="grid">{"".join(cells)}</div>')
    return page(f"{m} {layer.name}", "../../", [("atlas", "../../index.html"), (m, "../index.html"),
                                                 (layer.name, "index.html")], body)


def unit_page(entry: Entry, neighbours: dict[str, UnitKey | None], here: UnitKey) -> str:
    e = entry
    c = e["channel"]
    fv = e["fv"]
    parts = [f'<p><span class="assoc">class association: {_e(association(e) or "none")}</span>'
             f'{" <b>dead unit</b> (never positive on the dataset)" if e.get("dead") else ""}</p>']
    parts.append('<h2>Feature visualisation</h2><div class="row">'
                 f'<figure class="fv"><img src="img/{_e(fv["file"])}" alt="feature visualisation">'
                 f'<figcaption>default preset · objective {fv["objective"]:.3g}<br>'
                 f'model sees: {_e(", ".join(fv["predictions"]))}</figcaption></figure></div>')
    div = e.get("diverse")
    if div:
        figs = "".join(f'<figure class="diverse"><img src="img/{_e(f)}" alt="diverse {i}">'
                       f'<figcaption>objective {v:.3g}</figcaption></figure>'
                       for i, (f, v) in enumerate(zip(div["files"], div["objectives"], strict=True)))
        parts.append(f'<h2>A diverse set (one job, diversity weight {div["weight"]:g})</h2>'
                     f'<p class="muted">mean pairwise Gram similarity {div["gram_similarity"]:.3f}</p>'
                     f'<div class="row">{figs}</div>')
    crops, photos = [], []
    for i, t in enumerate(e.get("top") or []):
        label = f'#{i + 1} · {t["score"]:.3g} · {_e(t["source"])}'
        if t.get("crop"):
            crops.append(f'<figure class="crop"><img src="img/{_e(t["crop"])}" alt="top crop {i + 1}">'
                         f'<figcaption>{label}</figcaption></figure>')
        if t.get("photo"):
            predicted = "" if not t.get("label") else \
                f'<br>predicted: {_e(t["label"])} (p {t.get("probability") or 0:.2f})'
            photos.append(f'<figure class="photo"><img src="img/{_e(t["photo"])}" alt="top photo {i + 1}">'
                          f'<figcaption>{label}{predicted}</figcaption></figure>')
    parts.append(f'<h2>Top dataset regions ({_e(e.get("dataset", ""))})</h2><div class="row">{"".join(crops)}</div>'
                 '<h2>Where they are (the receptive field ringed, the rest of the photo dimmed)</h2>'
                 f'<div class="row">{"".join(photos)}</div>')
    s = e.get("stats")
    if s:
        parts.append(f'<h2>Channel statistics</h2><table><tr><th>images</th><td>{s["images"]}</td></tr>'
                     f'<tr><th>mean (every position)</th><td>{s["mean"]:.4g}</td></tr>'
                     f'<tr><th>max</th><td>{s["max"]:.4g}</td></tr>'
                     f'<tr><th>positive fraction</th><td>{s["positive_fraction"]:.1%}</td></tr></table>')
    classes = ", ".join(f'{_e(k["label"])} ×{k["count"]} (mean p {k.get("probability", float("nan")):.2f})'
                        for k in e.get("classes") or [])
    parts.append('<h2>Classes its top photos are predicted as</h2><p class="muted">the model\'s top-1 class on '
                 'each whole photo, how many of the top photos, their mean top-1 probability; a class '
                 'association is named only when one class is at least half of them (and two or more)</p>'
                 f'<p>{classes or "—"}</p>')
    nav = []
    for text, key in neighbours.items():
        if key is not None:
            href = f"{key.channel}.html" if key.layer == here.layer else f"../{slug(key.layer)}/{key.channel}.html"
            nav.append(f'<a rel="{_e(text)}" href="{href}">{_e(text)}: {_e(key.layer)}:{key.channel}</a>')
    parts.append(f'<h2>Neighbours</h2><p class="nav">{"".join(nav)}</p>')
    m = e["model"]
    return page(f"{m} {e['layer']}:{c}", "../../", [("atlas", "../../index.html"), (m, "../index.html"),
                                                     (e["layer"], "index.html"), (str(c), f"{c}.html")],
                "".join(parts))


def compare_page(left: str, right: str, rows: Sequence[tuple[str, float, str, float]],
                 thumbs: dict[tuple[str, str], list[tuple[str, str]]]) -> str:
    def side(model: str, layer: str, d: float) -> str:
        imgs = "".join(f'<a href="{href}"><img src="{src}" alt=""></a>' for href, src in thumbs.get((model, layer), []))
        return (f'<td><a href="{slug(model)}/{slug(layer)}/index.html">{_e(layer)}</a> '
                f'<span class="muted">depth {d:.2f}</span><br>{imgs}</td>')
    body = "".join(f"<tr>{side(left, a, da)}{side(right, b, db)}</tr>" for a, da, b, db in rows)
    table = f'<table class="compare"><tr><th>{_e(left)}</th><th>{_e(right)}</th></tr>{body}</table>'
    return page(f"{left} vs {right}", "", [("atlas", "index.html"), ("compare", "compare.html")],
                "<p>Each row: a layer of the first model and the layer of the second at the nearest relative "
                f"depth (position in the layer catalog).</p>{table}")


def search_script(entries: Sequence[Entry]) -> str:
    units = [{"model": e["model"], "layer": e["layer"], "channel": e["channel"],
              "url": UnitKey(e["model"], e["layer"], e["channel"]).page(),
              "classes": [k["label"] for k in e.get("classes") or []],
              "association": (dominant(e) or {}).get("label")} for e in entries]
    return "window.CONVLENS_ATLAS = " + json.dumps(units, separators=(",", ":")) + ";\n"
