"""Exported samples (JSON, HTML, terminal) against the store and the transcoder they came from."""
from __future__ import annotations

import json
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


def export_json(run: Path, out: Path, **kw) -> tuple[dict, dict[int, dict]]:
    path = run_export(ExportConfig(run=str(run), out=str(out), format="json", context=CONTEXT, device="cpu", **kw))
    index = json.loads(path.read_text())
    return index, {e["id"]: json.loads((out / e["file"]).read_text()) for e in index["features"]}


def all_samples(rec: dict) -> list[dict]:
    return rec["top"] + [s for iv in rec["intervals"] for s in iv["samples"]]


def check_contexts(records: dict[int, dict], store: Store, tc: Transcoder, exact: bool) -> int:
    """Every sample's tokens are the stored ids at its rows; its per-token activations are the
    transcoder's; with exact samples its activation is the transcoder's too."""
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
            acts = tc.encode(torch.from_numpy(store.source[a:r + 1]).float())[:, f].numpy()
            np.testing.assert_allclose(s["acts"], acts, rtol=1e-4, atol=1e-4)
            if exact:
                assert s["activation"] == pytest.approx(float(acts[-1]), rel=1e-4)
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
    """Collects the feature list and the rendered contexts of the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.list_ids: list[int] = []
        self.contexts: list[dict] = []
        self.stack: list[tuple[str, set[str]]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if "feat" in cls:
            self.list_ids.append(int(a["data-id"]))
        if "ctx" in cls:
            self.contexts.append({"row": int(a["data-row"]), "kind": a["data-kind"], "text": "", "hit": "",
                                  "feature": int(a["data-feature"])})
        self.stack.append((tag, cls))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        classes = set().union(*(c for _, c in self.stack)) if self.stack else set()
        if "text" in classes and self.contexts:
            self.contexts[-1]["text"] += data
            if "hit" in classes:
                self.contexts[-1]["hit"] += data


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
    # the list: every exported feature, sorted by density (the default), highest first
    by_density = sorted(records, key=lambda i: (-records[i]["density"], i))
    assert parsed.list_ids == by_density
    # the feature's contexts: same rows, text and highlighted token as the JSON
    shown = lambda t: t.replace("\n", "\u21b5").replace("\t", "\u2192")   # noqa: E731  (how the page shows breaks)
    top = [c for c in parsed.contexts if c["kind"] == "top"]
    assert [c["feature"] for c in parsed.contexts] == [f] * len(parsed.contexts)
    assert [c["row"] for c in top] == [s["row"] for s in records[f]["top"]]
    for c, s in zip(top, records[f]["top"]):
        assert c["text"] == shown(s["text"]) and c["hit"] == shown(s["token"])
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
