"""`tc samples export --run SET`: one browser for every layer of a set, each layer's data exactly its
one-run export, and a layer selector that switches layers and keeps the layer in the address."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.export import ExportConfig, run_export
from test_export import PageParser, chromium, run_chromium, selective_order

REPO = Path(__file__).resolve().parents[1]
LAYERS = (1, 3)
CACHE = ["cache", "--model", "tiny", "--dataset", "python-docs", "--tokens", "2048", "--seq-len", "64",
         "--chunk-rows", "256", "--layers", ",".join(map(str, LAYERS))]
TRAIN = ["--dict-size", "128", "--groups", "32,96", "--k", "4", "--batch-size", "128", "--steps", "16",
         "--log-every", "8", "--checkpoint-every", "16", "--sample-every", "4", "--samples-per-feature", "4"]
OPTS = {"context": 8, "device": "cpu", "logit_tokens": 0}


def tc(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def runset(tmp_path_factory) -> Path:
    """A set of the tiny model's layers 1 and 3 (training samples only)."""
    root = tmp_path_factory.mktemp("export_set")
    tc([*CACHE, "--out", str(root / "m.zarr")])
    tc(["train", "--cache", str(root / "m.zarr"), "--layers", "all", "--out", str(root / "set"), *TRAIN])
    return root / "set"


def without_out(index: dict) -> dict:
    """An export's record less the one thing that names where it was written."""
    return {**index, "config": {k: v for k, v in index["config"].items() if k != "out"}}


def embedded(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r"window\.TC_DATA = (.*?);</script>", text, re.S).group(1))


def test_each_layer_of_a_set_export_is_that_layers_one_run_export(runset, tmp_path):
    path = run_export(ExportConfig(run=str(runset), out=str(tmp_path / "set"), format="json", **OPTS))
    assert path == tmp_path / "set" / "layers.json"
    listing = json.loads(path.read_text())
    assert [x["layer"] for x in listing["layers"]] == list(LAYERS)
    indexes = {}
    for layer in LAYERS:
        ours, single = tmp_path / "set" / f"layer_{layer}", tmp_path / "single" / f"layer_{layer}"
        run_export(ExportConfig(run=str(runset / f"layer_{layer}"), out=str(single), format="json", **OPTS))
        a, b = (json.loads((d / "features.json").read_text()) for d in (ours, single))
        assert a["layer"] == layer and without_out(a) == without_out(b)
        assert a["features"], "a layer with no exported feature tests nothing"
        for entry in a["features"]:
            assert (ours / entry["file"]).read_text() == (single / entry["file"]).read_text()
        assert without_out(json.loads((ours / "export.json").read_text())) == \
            without_out(json.loads((single / "export.json").read_text()))
        indexes[layer] = a
    # the layers differ (an export that wrote one layer twice would pass the above for that layer)
    assert indexes[1]["features"] != indexes[3]["features"]
    # the page holds the same data per layer as each layer's one-run page
    page = run_export(ExportConfig(run=str(runset), out=str(tmp_path / "html"), **OPTS))
    data = embedded(page)
    assert data["set"]["layers"] == list(LAYERS) and [x["layer"] for x in data["layers"]] == list(LAYERS)
    for entry, layer in zip(data["layers"], LAYERS):
        one = embedded(run_export(ExportConfig(run=str(runset / f"layer_{layer}"), out=str(tmp_path / f"h{layer}"),
                                               **OPTS)))
        entry = {k: v for k, v in entry.items() if k != "layer"}
        entry["meta"], one["meta"] = without_out(entry["meta"]), without_out(one["meta"])
        assert entry == one


def test_a_set_layer_and_bad_layers(runset, tmp_path):
    page = run_export(ExportConfig(run=str(runset), layer=3, out=str(tmp_path / "l3"), **OPTS))
    assert embedded(page)["meta"]["layer"] == 3 and "set" not in embedded(page)
    r = CliRunner().invoke(app, ["samples", "export", "--run", str(runset), "--layer", "2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "has no transcoder of layer 2" in r.output and not (tmp_path / "x").exists()


# switch the selector to the last layer and click the first feature of its list, as a person would;
# then record the address the page ended on (the dumped DOM has no location)
SWITCH = """<script>
window.addEventListener("load", () => {
  const s = document.getElementById("layer");
  s.value = s.options[s.options.length - 1].value;
  s.dispatchEvent(new Event("change"));
  setTimeout(() => {
    document.body.dataset.afterSwitch = location.hash;
    document.querySelector(".feat").click();
    setTimeout(() => { document.body.dataset.afterClick = location.hash; }, 50);
  }, 50);
});
</script>
</body>"""


def render(url: str, profile: Path) -> tuple[PageParser, str]:
    dom = run_chromium(url, profile, "--dump-dom")
    parsed = PageParser()
    parsed.feed(dom)
    return parsed, dom


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_the_layer_selector_switches_layers_and_the_address_keeps_the_layer(runset, tmp_path):
    page = run_export(ExportConfig(run=str(runset), out=str(tmp_path / "html"), **OPTS))
    json_dir = tmp_path / "json"
    run_export(ExportConfig(run=str(runset), out=str(json_dir), format="json", **OPTS))
    records = {L: {e["id"]: json.loads((json_dir / f"layer_{L}" / e["file"]).read_text())
                   for e in json.loads((json_dir / f"layer_{L}" / "features.json").read_text())["features"]}
               for L in LAYERS}
    order = {L: selective_order(records[L]) for L in LAYERS}
    assert order[1] != order[3]
    uri = page.resolve().as_uri()
    opened, dom = render(uri, tmp_path / "p0")          # no address: the first layer
    assert opened.list_ids == order[1] and 'id="layer-box"' in dom and "<option" in dom
    # an address with a layer opens that layer: its list, and its feature's contexts
    f = max(records[3], key=lambda i: (len(records[3][i]["top"]), records[3][i]["fires"]))
    linked, dom = render(uri + f"#L3/f{f}", tmp_path / "p1")
    assert linked.list_ids == order[3] and f"Feature {f}" in dom and "layer 3 · " in dom
    assert [c["row"] for c in linked.contexts if c["kind"] == "top"] == [s["row"] for s in records[3][f]["top"]]
    assert {c["feature"] for c in linked.contexts} == {f}
    # the selector: from layer 1 to layer 3, then a click on a feature keeps the layer in the address
    switched = tmp_path / "switched.html"
    switched.write_text(page.read_text(encoding="utf-8").replace("</body>", SWITCH), encoding="utf-8")
    after, dom = render(switched.resolve().as_uri(), tmp_path / "p2")
    assert after.list_ids == order[3]
    assert 'data-after-switch="#L3"' in dom and f'data-after-click="#L3/f{order[3][0]}"' in dom
    # a screenshot for people to look at
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "samples_browser_set.png"
    shot.unlink(missing_ok=True)
    run_chromium(uri + f"#L3/f{f}", tmp_path / "p3", f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
