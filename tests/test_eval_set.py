"""`tc eval --run SET`: every member's numbers, and the model's loss with all the set's layers
spliced in at once, checked against a splice written out by hand in this file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli import app
from pipeline import evaluate as ev
from pipeline import lm_eval
from pipeline.store import Store
from pipeline.transcoder import Transcoder, norm_constants

LAYERS = (1, 3)   # of tiny's 4 blocks
PAIRS = {L: (f"blocks.{L}.hook_resid_mid", f"blocks.{L}.hook_mlp_out") for L in LAYERS}


@pytest.fixture(scope="module")
def tiny():
    from pipeline.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(autouse=True)
def load_tiny_once(monkeypatch, tiny):
    """Every eval here splices into tiny: load it once (saves seconds per command)."""
    from pipeline import models

    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, *a, **k: tiny if spec == "tiny" else real(spec, *a, **k))


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory) -> Path:
    """A tiny store of layers 1 and 3 (the store a set is trained from)."""
    path = tmp_path_factory.mktemp("eval_set") / "m.zarr"
    r = CliRunner().invoke(app, ["cache", "--model", "tiny", "--dataset", "python-docs", "--tokens", "2048",
                                 "--seq-len", "64", "--chunk-rows", "256", "--layers", "1,3", "--out", str(path)])
    assert r.exit_code == 0, r.output
    return path


def member_transcoder(store: Store, seed: int) -> Transcoder:
    """A random transcoder normalised to the layer's statistics: it fires, and its prediction is
    far from the real MLP output, so splicing it in changes the loss."""
    tc = Transcoder(store.d_model, store.d_model, [16, 32, 80], 4, seed=seed)
    n = norm_constants(store.stats())
    tc.set_normalization(n["source_mean"], n["source_scale"], n["target_mean"], n["target_scale"])
    tc.sparsity.threshold.fill_(0.05)
    return tc.eval()


def make_set(root: Path, store_path: Path, layers=LAYERS) -> Path:
    """A set folder as `tc train --layers` leaves it (manifest, one run folder per layer), around
    hand-made transcoders."""
    root.mkdir(parents=True)
    (root / "set.json").write_text(json.dumps({"kind": "tc transcoder set", "layers": list(layers),
                                               "store": str(store_path)}))
    for layer in layers:
        run = root / f"layer_{layer}"
        run.mkdir()
        member_transcoder(Store(store_path, layer), seed=layer).save(run / "transcoder.safetensors")
        (run / "config.json").write_text(json.dumps({"cache": str(store_path), "layer": layer}))
    return root


def sequences(n: int = 5, seq_len: int = 24, bos: int = 2) -> np.ndarray:
    rng = np.random.default_rng(1)
    seqs = rng.integers(4, 512, size=(n, seq_len))
    seqs[:, 0] = bos
    seqs[2, 11] = bos   # a document boundary inside a sequence
    return seqs


def by_hand(model, seqs: np.ndarray, replace: dict[int, object], bos: int) -> dict[str, float]:
    """Mean CE and KL(clean || spliced) with every layer in `replace` spliced at once, written out
    directly: hooks read each layer's source in the spliced forward and put replace[L](source) in
    place of its MLP output (BOS positions keep theirs); losses from torch's own functions."""
    tokens = torch.from_numpy(seqs).long()
    bos_pos = tokens == bos
    seen = {}

    def hooks_of(layer, fn):
        def read(t, hook):
            seen[layer] = t

        def write(t, hook):
            return torch.where(bos_pos[..., None], t, fn(seen[layer], t).to(t.dtype))

        return [(PAIRS[layer][0], read), (PAIRS[layer][1], write)]

    with torch.no_grad():
        clean = model(tokens, return_type="logits").float()
        hooks = [h for layer, fn in replace.items() for h in hooks_of(layer, fn)]
        spliced = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits").float()
    keep = (tokens[:, 1:] != bos) & (tokens[:, :-1] != bos)
    target = tokens[:, 1:][keep]
    lc, ls = clean[:, :-1][keep].double(), spliced[:, :-1][keep].double()
    ce = F.cross_entropy(ls, target, reduction="none")
    kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lc, -1), log_target=True, reduction="none").sum(-1)
    return {"ce": float(ce.mean()), "kl": float(kl.mean()), "ce_clean": float(F.cross_entropy(lc, target))}


def predictor(tc: Transcoder):
    return lambda source, target: tc.predict(source.reshape(-1, source.shape[-1]).float()).reshape(target.shape)


@pytest.mark.parametrize("method", ["shared", "separate"])
def test_all_layers_spliced_at_once_equal_a_hand_made_splice_of_every_layer(tiny, multi_store, method):
    tcs = {L: member_transcoder(Store(multi_store, L), seed=L) for L in LAYERS}
    splices = {"all": {PAIRS[L]: lm_eval.transcoder_replacement(tcs[L]) for L in LAYERS},
               **{f"only_{L}": {PAIRS[L]: lm_eval.transcoder_replacement(tcs[L])} for L in LAYERS}}
    seqs = sequences()
    got = lm_eval.splice_losses(tiny.model, seqs, splices, tiny.bos_id, False, batch_size=2, device="cpu",
                                progress=False, method=method)
    want = by_hand(tiny.model, seqs, {L: predictor(tcs[L]) for L in LAYERS}, tiny.bos_id)
    assert got["clean"]["ce"] == pytest.approx(want["ce_clean"], rel=1e-5)
    assert got["all"]["ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert got["all"]["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    for L in LAYERS:   # each layer alone is its own splice, and both layers really matter
        alone = by_hand(tiny.model, seqs, {L: predictor(tcs[L])}, tiny.bos_id)
        assert got[f"only_{L}"]["ce"] == pytest.approx(alone["ce"], rel=1e-5)
        assert abs(alone["ce"] - want["ce"]) > 1e-3 and got[f"only_{L}"]["kl"] > 1e-3


def test_planted_splices_behave_as_expected(tiny, multi_store):
    """The identity at every layer is the clean model; zeros at every layer is the all-ablated
    model; the identity at one layer and a transcoder at the other is that transcoder alone; and
    the first layer's replacement changes what the second layer's transcoder reads."""
    tc3 = lm_eval.transcoder_replacement(member_transcoder(Store(multi_store, 3), seed=3))
    ident, zero = lm_eval.identity_replacement, lm_eval.zero_replacement
    splices = {"identity": {PAIRS[1]: ident, PAIRS[3]: ident}, "zeros": {PAIRS[1]: zero, PAIRS[3]: zero},
               "ident_then_tc": {PAIRS[1]: ident, PAIRS[3]: tc3}, "tc_alone": {PAIRS[3]: tc3},
               "zero_then_tc": {PAIRS[1]: zero, PAIRS[3]: tc3}}
    seqs = sequences()
    got = lm_eval.splice_losses(tiny.model, seqs, splices, tiny.bos_id, False, batch_size=5, device="cpu",
                                progress=False)
    assert got["identity"]["ce"] == pytest.approx(got["clean"]["ce"], rel=1e-6) and got["identity"]["kl"] < 1e-6
    assert got["ident_then_tc"]["ce"] == pytest.approx(got["tc_alone"]["ce"], rel=1e-6)
    want = by_hand(tiny.model, seqs, {1: zero, 3: zero}, tiny.bos_id)
    assert got["zeros"]["ce"] == pytest.approx(want["ce"], rel=1e-5) and got["zeros"]["kl"] > 1e-3
    want = by_hand(tiny.model, seqs, {1: zero, 3: predictor(member_transcoder(Store(multi_store, 3), seed=3))},
                   tiny.bos_id)
    assert got["zero_then_tc"]["ce"] == pytest.approx(want["ce"], rel=1e-5)
    assert abs(got["zero_then_tc"]["ce"] - got["tc_alone"]["ce"]) > 1e-3


def test_tc_eval_of_a_set_writes_every_layer_and_the_all_spliced_loss(multi_store, tmp_path):
    s = make_set(tmp_path / "set", multi_store)
    r = CliRunner().invoke(app, ["eval", "--run", str(s), "--tokens", "512", "--device", "cpu", "--each-layer"])
    assert r.exit_code == 0, r.output
    for words in ("a set of 2 transcoders: layers 1,3", "CE all spliced", "KL(clean || all zero)", "CE alone"):
        assert words in r.output, words
    saved = json.loads((s / "eval.json").read_text())
    assert saved["layers"] == [1, 3] and sorted(saved["per_layer"]) == ["1", "3"]
    assert saved["config"]["run"] == str(s) and "torch" in saved["versions"] and (s / "tc-eval.toml").exists()
    assert (s / "eval_fvu_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    lm = saved["lm"]
    assert set(lm["per_pass"]) == {"clean", "spliced", "zero", "layer_1", "layer_3"}
    assert lm["fraction_recovered"] == pytest.approx(lm_eval.fraction_recovered(lm["ce_clean"], lm["ce_spliced"],
                                                                                lm["ce_zero"]))
    for layer in (1, 3):
        rows = saved["per_layer"][str(layer)]["rows"]
        assert saved["per_layer"][str(layer)]["hooks"]["source"] == PAIRS[layer][0]
        assert rows["n_rows"] > 0 and rows["rows_are_training_rows"]
    assert saved["per_layer"]["1"]["rows"]["fvu"] != saved["per_layer"]["3"]["rows"]["fvu"]
    for layer in (1, 3):   # all at once is neither layer alone (a set splicing one member would be)
        assert abs(lm["ce_spliced"] - lm["per_pass"][f"layer_{layer}"]["ce"]) > 1e-4
    # a member evaluated on its own: the same store-row numbers, and its splice is the set's layer_3 pass
    one = ev.run_eval(ev.EvalConfig(run=str(s / "layer_3"), tokens=512, device="cpu"), progress=False)
    assert one["rows"]["fvu_per_prefix"] == saved["per_layer"]["3"]["rows"]["fvu_per_prefix"]
    assert one["lm"]["ce_spliced"] == pytest.approx(lm["per_pass"]["layer_3"]["ce"], rel=1e-6)
    assert one["lm"]["ce_clean"] == pytest.approx(lm["ce_clean"], rel=1e-6)


def test_a_set_of_one_layer_evaluates_exactly_as_its_run(multi_store, tmp_path):
    s = make_set(tmp_path / "set", multi_store, layers=(3,))
    whole = ev.run_eval(ev.EvalConfig(run=str(s), tokens=512, device="cpu"), progress=False)
    one = ev.run_eval(ev.EvalConfig(run=str(s / "layer_3"), tokens=512, device="cpu"), progress=False)
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero", "fraction_recovered", "n_scored_tokens"):
        assert whole["lm"][key] == one["lm"][key], key
    assert whole["per_layer"]["3"]["rows"] == one["rows"]


def test_a_set_with_an_unfinished_member_is_one_line(multi_store, tmp_path):
    import subprocess
    import sys

    s = make_set(tmp_path / "set", multi_store)
    (s / "layer_3" / "transcoder.safetensors").unlink()
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "--run", str(s), "--no-lm-loss"], capture_output=True,
                       text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 2 and "layer_3 has no final transcoder" in r.stderr and "Traceback" not in r.stderr
    assert not (s / "eval.json").exists()
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "--run", str(s / "layer_1"), "--each-layer"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 2 and "--each-layer is for a set" in r.stderr and "Traceback" not in r.stderr
