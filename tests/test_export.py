"""Exported samples (JSON, HTML, terminal) against the store and the transcoder they came from."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.collect import CollectConfig, run_collect
from pipeline.export import ExportConfig, run_export, show_feature
from pipeline.samples import load_samples
from pipeline.store import FLAG_BOS, Store
from pipeline.train import TrainConfig, run_train
from pipeline.transcoder import Transcoder
from pipeline.util import UserError

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 8
AFTER = 4          # the export's default --after


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_store):
    """A short real training run (samples collected every 10 steps), then the exact pass."""
    root = tmp_path_factory.mktemp("export")
    run = run_train(TrainConfig(cache=str(synthetic_store), dict_size=128, groups=[32, 32, 64], k=4, steps=60,
                                batch_size=256, lr=3e-3, warmup_steps=5, sample_every=10, sample_context=CONTEXT,
                                top_features=5, samples_per_feature=3, log_every=20, checkpoint_every=60,
                                out=str(root / "run"), device="cpu"))
    training_only = root / "training_only"
    shutil.copytree(run, training_only)
    run_collect(CollectConfig(run=str(run), top_n=6, intervals=3, interval_samples=2, hist_bins=12, device="cpu"))
    return run, training_only


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run on a d=64 synthetic store, the width of the tiny Gemma-2, so its logit effects can be
    computed with that model; 512 latents for 60 steps leaves dead and rarely firing features."""
    from conftest import write_synthetic_store

    root = tmp_path_factory.mktemp("tiny_export")
    store = write_synthetic_store(root / "t.zarr", d_model=64)
    run = run_train(TrainConfig(cache=str(store), dict_size=512, groups=[64, 128, 320], k=4, steps=60,
                                batch_size=256, lr=3e-3, warmup_steps=5, sample_every=0, log_every=20,
                                checkpoint_every=60, out=str(root / "run"), device="cpu"))
    run_collect(CollectConfig(run=str(run), top_n=6, intervals=3, interval_samples=2, hist_bins=12, device="cpu"))
    return run


@pytest.fixture
def tiny_model_with_norm(monkeypatch):
    """The tiny Gemma-2 with a random final-norm weight: its random init has weight 0 (scale 1 + 0),
    which would hide a forgotten norm scale. Returns the HF model the export will load."""
    import pipeline.models as models

    original = models._tiny_model

    def with_norm():
        m = original()
        with torch.no_grad():
            m.model.norm.weight.copy_(torch.linspace(-0.9, 2.0, m.config.hidden_size)[torch.randperm(
                m.config.hidden_size, generator=torch.Generator().manual_seed(1))])
        return m
    monkeypatch.setattr(models, "_tiny_model", with_norm)
    return with_norm()


def export_json(run: Path, out: Path, **kw) -> tuple[dict, dict[int, dict]]:
    path = run_export(ExportConfig(run=str(run), out=str(out), format="json", context=CONTEXT, device="cpu", **kw))
    index = json.loads(path.read_text())
    return index, {e["id"]: json.loads((out / e["file"]).read_text()) for e in index["features"]}


def all_samples(rec: dict) -> list[dict]:
    return rec["top"] + [s for iv in rec["intervals"] for s in iv["samples"]]


def expected_after_end(r: int, store: Store, n_after: int = AFTER) -> int:
    """The last row shown after row r, one row at a time: stop at the sequence's end and before a BOS."""
    end = r
    while end - r < n_after and (end + 1) % store.seq_len and end + 1 < store.n_rows \
            and not store.flags[end + 1] & FLAG_BOS:
        end += 1
    return end


def check_contexts(records: dict[int, dict], store: Store, tc: Transcoder, exact: bool) -> int:
    """Every sample's tokens are the stored ids at its rows, and so are the tokens after it (same
    sequence and document); its per-token activations are the transcoder's; with exact samples its
    activation is the transcoder's too."""
    vocab = store.vocab()
    n = 0
    for f, rec in records.items():
        for s in all_samples(rec):
            a, r = s["context_start"], s["row"]
            assert s["token_ids"] == store.tokens[a:r + 1].tolist()
            assert s["tokens"] == [vocab[i] for i in s["token_ids"]] and s["token"] == s["tokens"][-1]
            assert s["text"] == "".join(s["tokens"])
            assert 1 <= len(s["token_ids"]) <= CONTEXT and a // store.seq_len == r // store.seq_len
            assert not (store.flags[a + 1:r + 1] & FLAG_BOS).any()      # never crosses a document start
            end = expected_after_end(r, store)
            assert s["after_ids"] == store.tokens[r + 1:end + 1].tolist()
            assert s["after_tokens"] == [vocab[i] for i in s["after_ids"]]
            acts = tc.encode(torch.from_numpy(store.source[a:end + 1]).float())[:, f].numpy()
            np.testing.assert_allclose(s["acts"] + s["after_acts"], acts, rtol=1e-4, atol=1e-4)
            assert len(s["acts"]) == len(s["tokens"])
            if exact:
                assert s["activation"] == pytest.approx(float(acts[r - a]), rel=1e-4)
            n += 1
    return n


def top_by_max_activation(records: dict[int, dict], n: int) -> list[dict]:
    return sorted(records.values(), key=lambda r: -r["max_activation"])[:n]


def test_outlier_rows_do_not_take_over_the_top_of_the_browser(tmp_path):
    """Planted high-norm rows (1% of the store) would fill the top features by max activation;
    excluded by default, none of the top features shows one. With --include-outliers they do."""
    from conftest import write_synthetic_store

    planted = tuple(r for r in range(3, 8192, 97) if r % 64)
    store = write_synthetic_store(tmp_path / "o.zarr", outlier_rows=planted)
    run = run_train(TrainConfig(cache=str(store), dict_size=128, groups=[32, 96], k=4, steps=40, batch_size=256,
                                lr=3e-3, warmup_steps=5, sample_every=0, log_every=20, checkpoint_every=40,
                                out=str(tmp_path / "run"), device="cpu", include_outliers=True))

    def top_sample_rows(include_outliers: bool) -> list[int]:
        run_collect(CollectConfig(run=str(run), top_n=3, intervals=2, interval_samples=1, hist_bins=4, device="cpu",
                                  include_outliers=include_outliers, overwrite=True))
        _, records = export_json(run, tmp_path / f"export_{include_outliers}")
        return [s["row"] for r in top_by_max_activation(records, 10) for s in r["top"]]

    assert not set(top_sample_rows(False)) & set(planted)
    with_them = top_sample_rows(True)
    assert sum(r in planted for r in with_them) > len(with_them) / 2   # what the default prevents


def test_exported_contexts_match_store(trained_run, tmp_path):
    run, _ = trained_run
    index, records = export_json(run, tmp_path / "json")
    store, tc = Store(index["store"]), Transcoder.load(run / "transcoder.safetensors")
    s = load_samples(run)
    assert index["schema"] == "tc-feature-samples" and index["source"] == "exact"
    assert [e["id"] for e in index["features"]] == sorted(np.flatnonzero(s.fires > 0).tolist())
    assert index["config"]["format"] == "json" and "torch" in index["versions"]
    assert check_contexts(records, store, tc, exact=True) > 100
    for f, rec in records.items():
        assert [x["row"] for x in rec["top"]] == s.top_rows[f][s.top_rows[f] >= 0].tolist()
        assert sum(rec["histogram"]["counts"]) == rec["fires"]
        assert rec["density"] == pytest.approx(rec["fires"] / s.rows_total)
        assert rec["histogram"]["edges"][-1] == pytest.approx(rec["max_activation"])
        for iv in rec["intervals"]:
            assert all(iv["lo"] * (1 - 1e-6) <= x["activation"] <= iv["hi"] * (1 + 1e-6) for x in iv["samples"])
    assert json.loads((tmp_path / "json" / "export.json").read_text())["config"]["context"] == CONTEXT


def test_export_falls_back_to_training_samples(trained_run, tmp_path):
    _, run = trained_run
    index, records = export_json(run, tmp_path / "json", top_n=3)
    assert index["source"] == "training"
    store, tc = Store(index["store"]), Transcoder.load(run / "transcoder.safetensors")
    assert check_contexts(records, store, tc, exact=False) > 0
    for rec in records.values():
        assert rec["histogram"] is None and rec["intervals"] == []
        acts = [x["activation"] for x in rec["top"]]
        assert acts == sorted(acts, reverse=True) and min(acts) > 0.1     # above --sample-threshold


def test_export_selects_features(trained_run, tmp_path):
    run, _ = trained_run
    s = load_samples(run)
    index, _ = export_json(run, tmp_path / "a", max_features=4)
    top4 = np.argsort(-s.fires, kind="stable")[:4]
    assert [e["id"] for e in index["features"]] == sorted(top4.tolist())
    index, records = export_json(run, tmp_path / "b", features=[int(top4[0]), 1])
    assert {e["id"] for e in index["features"]} <= {int(top4[0]), 1} and int(top4[0]) in records


def test_export_bad_input(trained_run, tmp_path):
    run, _ = trained_run
    with pytest.raises(UserError, match="does not exist") as e:
        run_export(ExportConfig(run=str(tmp_path / "missing")))
    assert "\n" not in str(e.value)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("samples", "activation_samples"))
    with pytest.raises(UserError, match="no feature samples.*tc samples collect"):
        run_export(ExportConfig(run=str(bare)))
    with pytest.raises(UserError, match="feature 128 is out of range.*128 features"):
        run_export(ExportConfig(run=str(run), features=[3, 128], format="json", out=str(tmp_path / "x")))
    with pytest.raises(UserError, match="feature -1 is out of range"):
        show_feature(run, -1)
    with pytest.raises(UserError, match="--format"):
        run_export(ExportConfig(run=str(run), format="pdf"))
    assert not (tmp_path / "x").exists()                 # refused before writing anything


def test_show_feature(trained_run):
    run, _ = trained_run
    s = load_samples(run)
    f = int(np.argmax(s.fires))
    store = Store(json.loads((run / "config.json").read_text())["cache"])
    vocab = store.vocab()
    plain = show_feature(run, f, n=4, color=False, context=CONTEXT).splitlines()
    assert plain[0].startswith(f"feature {f} ") and len(plain) == 5
    for line, row in zip(plain[1:], s.top_rows[f]):
        assert line.endswith("\u00ab" + vocab[store.tokens[row]] + "\u00bb")
    colored = show_feature(run, f, n=4, color=True, context=CONTEXT)
    assert "\x1b[" in colored and "\u00ab" not in colored


# ----------------------------------------------------------------------------- the HTML page

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(url: str, profile: Path, *extra: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


class PageParser(HTMLParser):
    """Collects from the dumped DOM: the feature list, the rendered contexts (text before and at the
    activating token, the text after it), whitespace tokens, the stat cards, the logit tokens, the
    axis ticks of each chart and the text of elements with an id."""

    def __init__(self):
        super().__init__()
        self.list_ids: list[int] = []
        self.contexts: list[dict] = []
        self.ws: list[tuple[str, str]] = []          # (shown text, title) of whitespace tokens
        self.stats: dict[str, str] = {}
        self.logits: list[tuple[str, str]] = []      # (pos / neg, token)
        self.ticks: dict[str, dict[str, int]] = {}       # svg id -> {"x": ticks on x, "y": ticks on y}
        self.tick_labels: dict[str, list[str]] = {}
        self.by_id: dict[str, str] = {}
        self.stack: list[tuple[str, set[str], dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if "feat" in cls:
            self.list_ids.append(int(a["data-id"]))
        if "ctx" in cls:
            self.contexts.append({"row": int(a["data-row"]), "kind": a["data-kind"], "text": "", "hit": "",
                                  "after": "", "feature": int(a["data-feature"])})
        if "tok" in cls and "ws" in cls:
            self.ws.append(("", a.get("title", "")))
        if "logit" in cls:
            self.logits.append(("pos" if "pos" in cls else "neg", a["data-token"]))
        if "tick" in cls:
            svg = next((x["id"] for t, _, x in reversed(self.stack) if t == "svg"), None)
            axis = "x" if a["x1"] == a["x2"] else "y"               # an x-axis tick is a vertical stroke
            self.ticks.setdefault(svg, {"x": 0, "y": 0})[axis] += 1
        if "ticklabel" in cls:
            svg = next((x["id"] for t, _, x in reversed(self.stack) if t == "svg"), None)
            self.tick_labels.setdefault(svg, []).append("")
        if a.get("id"):
            self.by_id.setdefault(a["id"], "")
        self.stack.append((tag, cls, a))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        classes = set().union(*(c for _, c, _ in self.stack)) if self.stack else set()
        if "text" in classes and self.contexts:
            self.contexts[-1]["after" if "after" in classes else "text"] += data
            if "hit" in classes:
                self.contexts[-1]["hit"] += data
        if "ws" in classes and "tok" in classes and self.ws:
            self.ws[-1] = (self.ws[-1][0] + data, self.ws[-1][1])
        if "ticklabel" in classes:
            svg = next((x["id"] for t, _, x in reversed(self.stack) if t == "svg"), None)
            self.tick_labels[svg][-1] += data
        stat = next((x["data-stat"] for _, c, x in self.stack if "data-stat" in x), None)
        if stat and "v" in classes:
            self.stats[stat] = self.stats.get(stat, "") + data
        for _, _, x in self.stack:
            if x.get("id") in self.by_id:
                self.by_id[x["id"]] += data


def shown(t: str) -> str:
    """How the page shows a token: whitespace-only tokens mark every character, others only breaks."""
    if t.strip() == "":
        return t.replace("\r", "").replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")
    return t.replace("\r\n", "\u21b5").replace("\n", "\u21b5").replace("\t", "\u2192")


def readable_density(x: float) -> str:
    """The page's density format, written again: percent from 0.1% up, else "1 in N" (3 digits, k/M)."""
    if x >= 1e-3:
        return f"{100 * x:.2f}%"
    n = float(f"{1 / x:.3g}")
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"1 in {float(f'{n / size:.3g}'):g}{unit}"
    return f"1 in {n:g}"


def selective_order(records: dict[int, dict]) -> list[int]:
    """The default sort (docs/samples.md): density <= 1% and >= 10 fires first, each part by max activation."""
    ok = lambda r: r["density"] <= 0.01 and r["fires"] >= 10        # noqa: E731
    return sorted(records, key=lambda i: (not ok(records[i]), -records[i]["max_activation"], i))


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_html_browser_renders_the_samples(trained_run, tmp_path):
    run, _ = trained_run
    _, records = export_json(run, tmp_path / "json")
    page = run_export(ExportConfig(run=str(run), out=str(tmp_path / "html"), format="html", context=CONTEXT,
                                   device="cpu"))
    assert "TC_DATA" in page.read_text() and "http" not in page.read_text().split("<script>")[-1][:200]
    f = max(records, key=lambda i: (len(records[i]["top"]), records[i]["fires"]))
    url = page.resolve().as_uri() + f"#f{f}"
    dom = run_chromium(url, tmp_path / "profile", "--dump-dom")
    parsed = PageParser()
    parsed.feed(dom)
    # the list: every exported feature, in the default (selective) order
    assert parsed.list_ids == selective_order(records)
    # the feature's contexts: same rows, text, highlighted token and text after as the JSON
    top = [c for c in parsed.contexts if c["kind"] == "top"]
    assert [c["feature"] for c in parsed.contexts] == [f] * len(parsed.contexts)
    assert [c["row"] for c in top] == [s["row"] for s in records[f]["top"]]
    for c, s in zip(top, records[f]["top"]):
        assert c["text"] == "".join(map(shown, s["tokens"])) and c["hit"] == shown(s["token"])
        assert c["after"] == "".join(map(shown, s["after_tokens"]))
    assert any(c["after"] for c in top)
    # the store names no model this machine has: the page says the logit effects were left out
    assert "left out" in parsed.by_id["logits-absent"] and not parsed.logits
    expected_iv = [s["row"] for iv in reversed(records[f]["intervals"]) for s in iv["samples"]]
    assert [c["row"] for c in parsed.contexts if c["kind"] == "interval"] == expected_iv
    assert f"Feature {f}" in dom and 'id="hist"' in dom
    # a screenshot for people to look at
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "samples_browser.png"
    shot.unlink(missing_ok=True)
    run_chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# ----------------------------------------------------------------------------- logit effects, groups, overview

def test_logit_effects_match_the_model(tiny_run, tiny_model_with_norm, tmp_path, capsys):
    """Stored top tokens = an independent computation with the model's own modules: the final norm's
    forward times the direction's RMS (which leaves direction * norm scale), then lm_head, over the
    whole vocabulary, sorted. Each slow step says so on stderr as it starts (the model load, the
    products over the vocabulary, the pages: a minute and more on the demo)."""
    index, records = export_json(tiny_run, tmp_path / "json", model="tiny")
    err = capsys.readouterr().err
    said = [err.find(s) for s in ("export: loading tiny for the logit effects", "export: logit effects:",
                                  f"export: writing the pages of {len(records):,} features")]
    assert -1 not in said and said == sorted(said), err[-500:]
    assert index["logit_effects"]["available"] and index["logit_effects"]["tokens"] == 10
    hf = tiny_model_with_norm
    tc = Transcoder.load(tiny_run / "transcoder.safetensors")
    from pipeline.models import tiny_tokenizer, vocab_strings
    vocab = vocab_strings(tiny_tokenizer())
    feats = sorted(records)
    with torch.no_grad():
        d = tc.W_dec[feats] * tc.target_scale                              # raw target units
        rms = torch.sqrt(d.pow(2).mean(-1, keepdim=True) + hf.model.norm.eps)
        logits = hf.lm_head(hf.model.norm(d) * rms).numpy()              # (n, vocab)
    for j, f in enumerate(feats):
        got = records[f]["logit_effects"]
        order = np.argsort(-logits[j], kind="stable")
        for side, ids in (("positive", order[:10]), ("negative", order[::-1][:10])):
            assert [e["token_id"] for e in got[side]] == ids.tolist(), (f, side)
            np.testing.assert_allclose([e["value"] for e in got[side]], logits[j, ids], rtol=1e-3,
                                       atol=1e-5)
            assert [e["token"] for e in got[side]] == [vocab[i] for i in ids]


def test_logit_effects_left_out_when_the_model_is_not_there(trained_run, tmp_path, capsys):
    run, _ = trained_run
    index, records = export_json(run, tmp_path / "json")                 # the store's model: "synthetic"
    said = [line for line in capsys.readouterr().out.splitlines() if "logit effects" in line]
    assert len(said) == 1 and "left out" in said[0] and "synthetic" in said[0]
    assert index["logit_effects"]["available"] is False and "synthetic" in index["logit_effects"]["reason"]
    assert all(r["logit_effects"] is None for r in records.values())
    index, _ = export_json(run, tmp_path / "off", logit_tokens=0)
    assert "--logit-tokens 0" in index["logit_effects"]["reason"]


def test_groups_and_density_overview(tiny_run, tmp_path):
    index, records = export_json(tiny_run, tmp_path / "json", logit_tokens=0)
    groups = json.loads((tiny_run / "config.json").read_text())["groups"]
    assert index["groups"] == groups
    s = load_samples(tiny_run)
    for f, rec in records.items():
        g = sum(f >= b for b in np.cumsum(groups))                     # boundaries at or below f
        assert rec["group"] == {"index": g, "start": sum(groups[:g]), "end": sum(groups[:g + 1]),
                                "count": len(groups)}
    h = index["density_histogram"]
    assert h["dead"] == int((s.fires == 0).sum()) > 0 and index["dead_ids"] == np.flatnonzero(s.fires == 0).tolist()
    assert sum(h["counts"]) == int((s.fires > 0).sum())
    logs = np.log10(s.density()[s.fires > 0])
    assert h["log10_edges"][0] <= logs.min() and logs.max() <= h["log10_edges"][-1]
    assert h["counts"] == np.histogram(logs, bins=h["log10_edges"])[0].tolist()


def test_text_after_stays_in_its_sequence_and_document():
    from pipeline.contexts import context_ends

    flags = np.zeros(40, dtype=np.uint8)
    flags[[0, 16, 32, 21]] = FLAG_BOS                                # sequences of 16, a document starts at 21
    rows = np.array([3, 14, 15, 19, 20, 30, 38, 39])
    assert context_ends(rows, flags, 16, 4).tolist() == [7, 15, 15, 20, 20, 31, 39, 39]
    assert context_ends(rows, flags, 16, 0).tolist() == rows.tolist()


def test_export_rejects_negative_after(trained_run, tmp_path):
    run, _ = trained_run
    for kw, name in ((dict(after=-1), "--after"), (dict(logit_tokens=-2), "--logit-tokens")):
        with pytest.raises(UserError, match=name) as e:
            run_export(ExportConfig(run=str(run), out=str(tmp_path / "x"), **kw))
        assert "\n" not in str(e.value)


WHITESPACE = {5: " ", 6: "\n", 7: "\t", 8: "  "}     # token ids the browser test gives whitespace texts


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_html_feature_page(tiny_run, tiny_model_with_norm, tmp_path, monkeypatch):
    """The page a researcher expects: the default order, logit effects, text after, the group, the
    density overview, axis ticks, visible whitespace, a dead feature searched for, a tiny density."""
    real_vocab = Store.vocab
    monkeypatch.setattr(Store, "vocab", lambda self: [WHITESPACE.get(i, t) for i, t in enumerate(real_vocab(self))])
    _, records = export_json(tiny_run, tmp_path / "json", model="tiny")
    page = run_export(ExportConfig(run=str(tiny_run), out=str(tmp_path / "html"), context=CONTEXT, device="cpu",
                                   model="tiny"))
    uri = page.resolve().as_uri()

    def render(suffix: str, name: str) -> tuple[PageParser, str]:
        dom = run_chromium(uri + suffix, tmp_path / f"profile_{name}", "--dump-dom")
        parsed = PageParser()
        parsed.feed(dom)
        return parsed, dom

    # opened plainly: the default order, and the first feature shown obeys the rule, not the densest one
    opened, _ = render("", "plain")
    order = selective_order(records)
    assert opened.list_ids == order[:300]
    first = records[order[0]]
    assert first["density"] <= 0.01 and first["fires"] >= 10
    assert order[0] != max(records, key=lambda i: records[i]["density"])
    assert opened.contexts and {c["feature"] for c in opened.contexts} == {order[0]}
    ticks = opened.ticks["density-overview"]
    assert ticks["x"] >= 3 and ticks["y"] >= 2 and "dead" in opened.by_id["overview"]
    decades = opened.tick_labels["density-overview"][:ticks["x"]]          # x labels come first: 10⁻⁴ ...
    assert all(t.startswith("10") for t in decades)

    # a feature whose contexts hold whitespace tokens
    def raw_tokens(rec):
        return {t for s in all_samples(rec) for t in s["tokens"] + s["after_tokens"]}
    f = next(i for i in order if raw_tokens(records[i]) & set(WHITESPACE.values()))
    parsed, _ = render(f"#f{f}", "feature")
    rec = records[f]
    effects = rec["logit_effects"]
    assert parsed.logits == [("pos", e["token"]) for e in effects["positive"]] + \
        [("neg", e["token"]) for e in effects["negative"]]
    assert parsed.stats["group"] == f"{rec['group']['index'] + 1} of 3"
    ticks = parsed.ticks["hist"]
    assert ticks["x"] >= 3 and ticks["y"] >= 2
    x_labels = [float(t) for t in parsed.tick_labels["hist"][:ticks["x"]]]
    assert x_labels == sorted(x_labels) and 0 <= x_labels[0] and x_labels[-1] <= rec["max_activation"]
    top = [c for c in parsed.contexts if c["kind"] == "top"]
    for c, s in zip(top, rec["top"]):
        assert c["after"] == "".join(map(shown, s["after_tokens"]))
    assert any(c["after"] for c in top)
    seen = {json.loads(re.search(r'· (".*") · activation', title).group(1)): text for text, title in parsed.ws}
    assert set(seen) == raw_tokens(rec) & set(WHITESPACE.values())
    for raw, text in seen.items():
        assert text == shown(raw) and text.strip() and set(text) <= set("\u00b7\u21b5\u2192")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "samples_browser_feature.png"
    shot.unlink(missing_ok=True)
    run_chromium(uri + f"#f{f}", tmp_path / "profile_feature", f"--screenshot={shot}", "--window-size=1400,1100")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the rarest feature: its density reads "1 in N", in the card and in the list
    rare = min(records, key=lambda i: (records[i]["density"], i))
    assert records[rare]["density"] < 1e-3
    parsed, dom = render(f"#f{rare}", "rare")
    assert parsed.stats["density"] == readable_density(records[rare]["density"])
    assert parsed.stats["density"].startswith("1 in ") and "e-" not in parsed.stats["density"]

    # a dead feature searched for: the list and the page say it is dead
    dead = int(np.flatnonzero(load_samples(tiny_run).fires == 0)[0])
    parsed, _ = render(f"?q=%23{dead}", "dead")
    assert "dead" in parsed.by_id["searched-absent"]
    assert f"Feature {dead} is dead" in parsed.by_id["absent"]
