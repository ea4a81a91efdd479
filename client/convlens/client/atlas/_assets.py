"""The atlas's one stylesheet and one script (no build step, no network: the site opens from the disk)."""

from ._photo import DISPLAY_HEIGHT, DISPLAY_WIDTH

CSS = """\
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1em 3em;
       color: #222; background: #fafafa; }
a { color: #0b5cad; text-decoration: none; } a:hover { text-decoration: underline; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 1em; border-bottom: 1px solid #ddd;
         padding: .6em 0; margin-bottom: 1em; }
header .crumbs { flex: 1; } header .crumbs a + a::before { content: " / "; color: #999; }
h1 { font-size: 1.5em; margin: .3em 0; } h2 { font-size: 1.15em; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee;
        text-align: left; } tr.mapped { background: #eef5ff; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
.cell { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 12px; }
.cell img { width: 100%; image-rendering: auto; display: block; }
.cell.dead { opacity: .45; border-color: #c33; } .cell.dead .tag { color: #c33; font-weight: 700; }
.row { display: flex; flex-wrap: wrap; gap: 10px; } .row figure { margin: 0; background: #fff; padding: 4px;
       border: 1px solid #ddd; border-radius: 4px; font-size: 12px; }
.fv img { width: 224px; } .diverse img { width: 160px; } .crop img { width: 120px; height: 120px;
       object-fit: contain; background: #eee; }
.assoc { font-size: 1.1em; padding: .3em .6em; background: #fff7e0; border: 1px solid #eed58a;
         border-radius: 4px; display: inline-block; }
.nav a { margin-right: 1em; }
#search { width: 22em; padding: 4px 6px; font-size: 14px; }
#results { list-style: none; padding: 0; margin: .3em 0; max-height: 18em; overflow: auto; font-size: 13px; }
#results li { padding: 1px 0; } .muted { color: #777; }
.compare td { vertical-align: top; } .compare img { width: 72px; }
"""
# The photos' largest display size, which the boxes drawn on them are sized for (_photo.py).
CSS += f".photo img {{ max-width: {DISPLAY_WIDTH}px; max-height: {DISPLAY_HEIGHT}px; }}\n"

JS = """\
// The search box: filter the atlas's units (search.js) by class, layer, layer:channel or model. Every word
// of the query must match (AND), each as a whole: a class word ("dog" finds "dog" and "hot dog", not
// "hotdog"), a layer or block ("layer1" finds layer1.0 and layer1.1, not layer10), "layer:channel" exactly,
// or the model's name. A bare number is a class word, never a channel.
(function () {
  var box = document.getElementById("search"), list = document.getElementById("results");
  if (!box || !list) return;
  var root = document.body.getAttribute("data-root") || "";
  var units = window.CONVLENS_ATLAS || [];
  function words(text) { return text.toLowerCase().split(/[^a-z0-9]+/).filter(Boolean); }
  function matches(u, q) {
    var layer = u.layer.toLowerCase(), colon = q.lastIndexOf(":");
    if (colon >= 0) {
      var l = q.slice(0, colon), c = q.slice(colon + 1);
      if (!/^[0-9]*$/.test(c) || l !== layer) return false;
      return c === "" || parseInt(c, 10) === u.channel;
    }
    if (q === u.model.toLowerCase() || q === layer || layer.indexOf(q + ".") === 0) return true;
    return u.classes.some(function (label) { return words(label).indexOf(q) >= 0; });
  }
  function show() {
    var query = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    list.innerHTML = "";
    if (!query.length) return;
    var hits = units.filter(function (u) { return query.every(function (q) { return matches(u, q); }); });
    hits.slice(0, 200).forEach(function (u) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = root + u.url;
      a.textContent = u.model + " " + u.layer + ":" + u.channel;
      li.appendChild(a);
      var about = u.association ? u.association + " (dominant)" : u.classes.join(", ");
      if (about) li.appendChild(document.createTextNode(" \\u2014 " + about));
      list.appendChild(li);
    });
    var more = document.createElement("li");
    more.className = "muted";
    more.textContent = hits.length + " unit" + (hits.length === 1 ? "" : "s");
    list.appendChild(more);
  }
  box.addEventListener("input", show);
  show();
})();
"""
