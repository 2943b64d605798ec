"""`tc eval`: the loss math, the splice, held-out text, store-row metrics, and end-to-end runs."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import evaluate as ev
from pipeline import lm_eval, row_eval
from pipeline.store import Store
from pipeline.transcoder import Transcoder, norm_constants
from pipeline.util import UserError

BOS = 2


# ----------------------------------------------------------------------------- the math

def test_fraction_recovered():
    assert lm_eval.fraction_recovered(2.0, 2.0, 3.0) == 1.0
    assert lm_eval.fraction_recovered(2.0, 3.0, 3.0) == 0.0
    assert lm_eval.fraction_recovered(2.0, 2.25, 3.0) == pytest.approx(0.75)
    assert lm_eval.fraction_recovered(2.0, 3.5, 3.0) == pytest.approx(-0.5)   # worse than no MLP
    assert lm_eval.fraction_recovered(2.0, 2.5, 2.0) is None                  # zero-ablation changes nothing


def test_score_mask_never_scores_bos_targets_and_skips_bos_inputs_by_default():
    tokens = torch.tensor([[BOS, 5, 6, BOS, 7, 8]])
    # position t predicts token t+1: targets 5, 6, BOS, 7, 8 from inputs BOS, 5, 6, BOS, 7
    assert lm_eval.score_mask(tokens, BOS, include_bos=False).tolist() == [[False, True, False, False, True]]
    assert lm_eval.score_mask(tokens, BOS, include_bos=True).tolist() == [[True, True, False, True, True]]


def test_position_losses_match_torch(monkeypatch):
    monkeypatch.setattr(lm_eval, "SCORE_CHUNK", 3)   # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g) * 3
    ref = torch.randn(2, 6, 11, generator=g) * 3
    tokens = torch.randint(3, 11, (2, 6), generator=g)
    tokens[:, 0] = BOS
    tokens[1, 3] = BOS
    mask = lm_eval.score_mask(tokens, BOS, include_bos=False)
    ce, kl = lm_eval.position_losses(logits, tokens, mask, ref_logits=ref)
    b, t = mask.nonzero(as_tuple=True)
    want_ce = F.cross_entropy(logits[b, t], tokens[b, t + 1], reduction="none")
    want_kl = F.kl_div(F.log_softmax(logits[b, t], -1), F.log_softmax(ref[b, t], -1), log_target=True,
                       reduction="none").sum(-1)
    assert len(ce) == int(mask.sum()) == 6
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(kl, want_kl)
    _, kl_self = lm_eval.position_losses(logits, tokens, mask, ref_logits=logits)
    assert kl_self.abs().max() < 1e-5


def test_loss_totals_streamed_equal_numpy_means_and_standard_error():
    """CE, KL and the CE increase's standard error (of the mean over positions), summed over two
    batches, equal the numbers computed over all positions at once."""
    g = torch.Generator().manual_seed(0)
    ce_clean = torch.rand(300, generator=g) * 4
    ce = ce_clean + torch.randn(300, generator=g) * 0.3 + 0.1
    kl = torch.rand(300, generator=g)
    tot = lm_eval.LossTotals()
    tot.add(ce[:120], kl[:120], ce_clean[:120])
    tot.add(ce[120:], kl[120:], ce_clean[120:])
    d = (ce - ce_clean).double().numpy()
    s = tot.summary()
    assert s["ce"] == pytest.approx(float(ce.double().mean()), rel=1e-9)
    assert s["kl"] == pytest.approx(float(kl.double().mean()), rel=1e-9)
    assert s["ce_increase"] == pytest.approx(d.mean(), rel=1e-9)
    assert s["ce_increase_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=1e-6)


# ----------------------------------------------------------------------------- splicing on `tiny`

@pytest.fixture(scope="module")
def tiny():
    from pipeline.models import load_model

    return load_model("tiny", device="cpu")


def tiny_sequences(n: int = 4, seq_len: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    seqs = rng.integers(4, 512, size=(n, seq_len))
    seqs[:, 0] = BOS
    seqs[1, 9] = BOS   # a document boundary inside a sequence
    return seqs


def splice(tiny, replacements, include_bos=False, layer=1):
    return lm_eval.lm_losses(tiny.model, tiny_sequences(), f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out",
                        replacements, tiny.bos_id, include_bos, batch_size=3, device="cpu", progress=False)


def test_splicing_identity_recovers_everything_and_zeros_nothing(tiny):
    losses = splice(tiny, {"identity": lm_eval.identity_replacement, "zero": lm_eval.zero_replacement})
    clean, ident, zero = losses["clean"], losses["identity"], losses["zero"]
    assert ident["ce"] == clean["ce"] and ident["kl"] == 0.0
    assert zero["ce"] != clean["ce"] and zero["kl"] > 0   # the zero splice really changed the model
    assert lm_eval.fraction_recovered(clean["ce"], ident["ce"], zero["ce"]) == 1.0
    assert lm_eval.fraction_recovered(clean["ce"], zero["ce"], zero["ce"]) == 0.0
    report = lm_eval.splice_report(losses, spliced="identity")
    assert report["fraction_recovered"] == 1.0 and report["ce_increase"] == 0.0
    assert report["n_scored_tokens"] == int(lm_eval.score_mask(torch.from_numpy(tiny_sequences()), BOS, False).sum())


def test_splice_takes_any_callable_and_sees_the_same_forwards_source(tiny):
    """Any (source, target) -> target callable splices in: a copy of the clean target changes
    nothing, noise changes the predictions."""
    seen = []

    def spy(source, target):
        seen.append((source.shape, target.shape))
        return target * 1.0

    noisy = lambda s, t: t + 10 * torch.randn_like(t)   # noqa: E731
    losses = splice(tiny, {"spy": spy, "noisy": noisy})
    assert seen and all(s == t and s[-1] == tiny.d_model for s, t in seen)
    assert losses["spy"]["ce"] == losses["clean"]["ce"]
    assert losses["noisy"]["kl"] > 0


def test_bos_positions_keep_the_clean_mlp_output_unless_include_bos(tiny):
    """A replacement that ruins only BOS positions changes nothing by default, everything with include_bos."""
    seqs = torch.from_numpy(tiny_sequences())

    def ruin_bos(source, target):
        out = target.clone()
        out[seqs[: len(target)] == BOS] += 100.0   # batches are the first rows here (batch_size >= n)
        return out

    def run(include_bos):
        return lm_eval.lm_losses(tiny.model, tiny_sequences(), "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out",
                            {"ruin": ruin_bos}, tiny.bos_id, include_bos, batch_size=8, device="cpu", progress=False)

    kept = run(False)
    assert kept["ruin"]["ce"] == kept["clean"]["ce"]
    assert run(True)["ruin"]["kl"] > 1e-3


# ----------------------------------------------------------------------------- the shared-prefix path

SUMMARY_KEYS = ("ce", "kl", "ce_increase", "ce_increase_stderr")


def wobble(source, target):
    """A replacement that depends on the source, so a wrong source or slice shows."""
    return target + 0.5 * torch.sin(3 * source)


@pytest.mark.parametrize("layer", [0, 1, 3])   # the first, a middle and the last of tiny's 4 blocks
@pytest.mark.parametrize("include_bos", [False, True])
def test_shared_prefix_path_equals_three_separate_forwards(tiny, monkeypatch, layer, include_bos):
    """The fast path (blocks before the layer run once, passes stacked, logits made a few positions
    at a time) gives the reference's numbers (a full forward per pass, the model's own logits) to
    float32 round-off: relative 1e-5 on every mean. Several score chunks, the last one partial,
    and a partial last batch."""
    monkeypatch.setattr(lm_eval, "SCORE_ELEMENTS", 4 * 7 * 512)   # 7 positions per chunk for 4 passes
    seqs = tiny_sequences(n=5)
    reps = {"identity": lm_eval.identity_replacement, "wobble": wobble, "zero": lm_eval.zero_replacement}
    hooks = f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"

    def run(method):
        return lm_eval.lm_losses(tiny.model, seqs, *hooks, reps, tiny.bos_id, include_bos, batch_size=2,
                                 device="cpu", progress=False, method=method)

    ref, fast = run("separate"), run("shared")
    assert fast["clean"]["n_scored"] == ref["clean"]["n_scored"] == int(
        lm_eval.score_mask(torch.from_numpy(seqs), BOS, include_bos).sum())
    for name in ("clean", *reps):
        for key in SUMMARY_KEYS:
            assert fast[name][key] == pytest.approx(ref[name][key], rel=1e-5, abs=1e-7), (name, key)
    assert ref["wobble"]["kl"] > 1e-4 and ref["zero"]["kl"] > 1e-4   # the splices really changed the model


def test_shared_path_is_the_default_and_leaves_the_model_as_it_was(tiny, monkeypatch):
    def no_separate(*args, **kwargs):
        raise AssertionError("the separate path ran")

    monkeypatch.setattr(lm_eval, "score_batch", no_separate)
    losses = splice(tiny, {"wobble": wobble})
    assert losses["wobble"]["kl"] > 0
    assert not [name for name, point in tiny.model.hook_dict.items() if point.fwd_hooks]
    assert all("forward" not in vars(block.original_component) for block in tiny.model.blocks)
    # hooks in two different blocks cannot share a prefix: the reference path runs instead
    assert lm_eval.splice_layer("blocks.1.hook_resid_mid", "blocks.2.hook_mlp_out") is None
    assert lm_eval.splice_layer("blocks.12.hook_resid_mid", "blocks.12.hook_mlp_out") == 12


def test_the_lm_bar_moves_within_a_batch_and_ends_at_the_token_count(tiny, monkeypatch):
    """A batch of the demo takes tens of seconds: the shared path advances the bar after every
    scoring chunk, by the batch's tokens in proportion to the positions scored, and the bar ends
    at exactly the token count. The separate path moves once per batch."""
    updates: list[float] = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.n = 0.0

        def update(self, k):
            updates.append(k)
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(lm_eval, "tqdm", Bar)
    monkeypatch.setattr(lm_eval, "SCORE_ELEMENTS", 3 * 7 * 512)   # 7 positions per chunk for 3 passes
    seqs = tiny_sequences(n=5)
    hooks = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"
    reps = {"wobble": wobble, "zero": lm_eval.zero_replacement}
    mask = lm_eval.score_mask(torch.from_numpy(seqs), BOS, False)
    chunks = sum(-(-int(mask[a:a + 2].sum()) // 7) for a in range(0, 5, 2))   # batches of 2 sequences
    assert chunks > 3
    for method, calls in (("shared", chunks), ("separate", 3)):
        updates.clear()
        lm_eval.lm_losses(tiny.model, seqs, *hooks, reps, tiny.bos_id, False, batch_size=2, device="cpu",
                          method=method)
        moved = [u for u in updates if u > 1e-9]
        assert len(moved) == calls, (method, updates)
        assert sum(updates) == pytest.approx(seqs.size)


def test_unembed_logits_equal_the_models_own_logits(tiny):
    """tiny is a Gemma-2 with a final logit softcap of 30: the shared path must apply it too."""
    tokens = torch.from_numpy(tiny_sequences()).long()
    seen = {}

    def grab(tensor, hook):
        seen["h"] = tensor

    with torch.no_grad():
        want = tiny.model.run_with_hooks(tokens, fwd_hooks=[("unembed.hook_in", grab)], return_type="logits")
        got = lm_eval.unembed_logits(tiny.model, seen["h"])
        into = lm_eval.unembed_logits(tiny.model, seen["h"], out=torch.empty(want.shape))   # the one-matmul path
    assert tiny.model.original_model.config.final_logit_softcapping == 30.0
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(into, want.float(), rtol=1e-6, atol=1e-6)


def test_chunk_losses_equal_position_losses():
    """The stacked loss formulas against the reference ones on random logits (clean first)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 50, generator=g) * 4                     # (P, n, V)
    targets = torch.randint(0, 50, (9,), generator=g)
    tokens = torch.cat([targets[:1], targets])[None]                     # position t predicts targets[t]
    mask = torch.ones(1, 9, dtype=torch.bool)
    ce, kl = lm_eval.chunk_losses(logits.clone(), targets)
    pad = lambda x: torch.cat([x, torch.zeros(1, 50)])[None]   # noqa: E731  (a last position, never scored)
    for p in range(3):
        want_ce, want_kl = lm_eval.position_losses(pad(logits[p]), tokens, mask, ref_logits=pad(logits[0]))
        torch.testing.assert_close(ce[p], want_ce)
        if p:
            torch.testing.assert_close(kl[p - 1], want_kl, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- held-out text

def fake_store(rows: np.ndarray) -> SimpleNamespace:
    """What held_out_sequences reads from a store: seq_len, n_rows and the token ids."""
    return SimpleNamespace(seq_len=rows.shape[1], n_rows=rows.size, tokens=rows.reshape(-1).astype(np.int32))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.models import tiny_tokenizer

    return tiny_tokenizer()


DOCS = [f"document number {i} says " + "the model reads tokens and writes vectors " * (1 + i % 5) for i in range(60)]


def test_held_out_text_starts_after_every_document_the_store_touched(tiny_tokenizer):
    from pipeline.text import pack_sequences

    seq_len = 16
    stored = np.stack(list(pack_sequences(DOCS, tiny_tokenizer, seq_len, BOS))[:20])   # the store's 20 rows
    seqs, info = lm_eval.held_out_sequences(iter(DOCS), tiny_tokenizer, BOS, 32, 5, fake_store(stored), progress=False)
    assert info["skipped_store_sequences"] == 20
    n_docs = info["skipped_documents"]
    # the store's last row cuts through document n_docs - 1, and the text restarts at document n_docs
    touched = tiny_tokenizer(DOCS[n_docs - 1], add_special_tokens=False)["input_ids"]
    assert stored[-1][-1] in touched
    stream = [t for t in stored.reshape(-1) if t != BOS]
    before = [t for d in DOCS[:n_docs - 1] for t in tiny_tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert len(before) < len(stream) <= len(before) + len(touched)
    want = np.stack(list(pack_sequences(DOCS[n_docs:], tiny_tokenizer, 32, BOS))[:5])
    np.testing.assert_array_equal(seqs, want)


def test_held_out_text_refuses_a_stream_that_does_not_reproduce_the_store(tiny_tokenizer):
    from pipeline.text import pack_sequences

    stored = np.stack(list(pack_sequences(DOCS, tiny_tokenizer, 16, BOS))[:10])
    changed = ["a different first document"] + DOCS[1:]
    with pytest.raises(UserError, match="does not reproduce"):
        lm_eval.held_out_sequences(iter(changed), tiny_tokenizer, BOS, 16, 2, fake_store(stored), progress=False)
    with pytest.raises(UserError, match="text ended"):
        lm_eval.held_out_sequences(iter(DOCS[:2]), tiny_tokenizer, BOS, 16, 2, fake_store(stored), progress=False)


def test_held_out_text_that_runs_out(tiny_tokenizer):
    from pipeline.text import pack_sequences

    every = np.stack(list(pack_sequences(DOCS, tiny_tokenizer, 16, BOS)))
    with pytest.raises(UserError, match="no held-out text"):
        lm_eval.held_out_sequences(iter(DOCS), tiny_tokenizer, BOS, 16, 4, fake_store(every), progress=False)
    seqs, _ = lm_eval.held_out_sequences(iter(DOCS), tiny_tokenizer, BOS, 16, 10**6, fake_store(every[:5]), progress=False)
    assert 0 < len(seqs) < 10**6 and (seqs[:, 0] == BOS).all()


# ----------------------------------------------------------------------------- store-row metrics

def random_transcoder(store: Store, groups=(16, 32, 80), k=4, threshold=0.5) -> Transcoder:
    tc = Transcoder(store.d_model, store.d_model, list(groups), k, seed=0)
    n = norm_constants(store.stats())
    tc.set_normalization(n["source_mean"], n["source_scale"], n["target_mean"], n["target_scale"])
    tc.sparsity.threshold.fill_(threshold)
    with torch.no_grad():
        tc.W_enc.mul_(2.0)
        tc.W_enc[100:].mul_(-1.0)       # some latents can never fire on these rows
        tc.b_enc[:4] = 5.0              # and some fire on everything
        tc.b_enc[100:] = -50.0
    return tc


def test_prefix_predictions_match_a_dense_reference(synthetic_store):
    store = Store(synthetic_store)
    tc = random_transcoder(store)
    x = torch.from_numpy(store.read_chunk(0).source[1:200]).float()
    preds, rows, cols = tc.predict_prefixes(x)
    acts = tc.encode(x)                                              # (B, L) dense, threshold rule
    for i, m in enumerate(tc.boundaries):
        want = tc.denormalize_target(acts[:, :m] @ tc.W_dec[:m] + tc.b_dec)
        torch.testing.assert_close(preds[i], want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(preds[-1], tc.predict(x), rtol=1e-5, atol=1e-4)
    assert len(rows) == int((acts > 0).sum())


def test_row_metrics_match_brute_force(synthetic_store):
    store = Store(synthetic_store)
    tc = random_transcoder(store)
    out = row_eval.row_metrics(tc, store, rows=3 * store.chunk_rows, device="cpu", dense_threshold=0.5,
                               batch_rows=300, progress=False)
    chunks = row_eval.pick_chunks(store.n_chunks, store.chunk_rows, 3 * store.chunk_rows)
    assert out["chunks"] == chunks and len(chunks) == 3
    keep = np.concatenate([store.read_chunk(c).flags == 0 for c in chunks])
    x = torch.from_numpy(np.concatenate([store.read_chunk(c).source for c in chunks])[keep]).float()
    y = np.concatenate([store.read_chunk(c).target for c in chunks])[keep].astype(np.float64)
    acts = tc.encode(x).numpy()
    W, b = tc.W_dec.detach().numpy().astype(np.float64), tc.b_dec.detach().numpy()
    total = ((y - y.mean(0)) ** 2).sum()
    for i, m in enumerate(tc.boundaries):
        pred = (acts[:, :m] @ W[:m] + b) * float(tc.target_scale) + tc.target_mean.numpy()
        assert out["fvu_per_prefix"][i] == pytest.approx(((y - pred) ** 2).sum() / total, rel=1e-4)
        assert out["variance_explained_per_prefix"][i] == pytest.approx(1 - out["fvu_per_prefix"][i])
    fired = (acts > 0).sum(0)
    l0 = (acts > 0).sum(1)
    assert out["n_rows"] == len(x)
    assert out["l0"] == pytest.approx(l0.mean())
    assert sum(out["l0_histogram"]) == len(x) and out["l0_quantiles"]["p50"] == int(np.quantile(l0, 0.5, method="inverted_cdf"))
    assert out["dead_features"] == int((fired == 0).sum()) >= 28          # latents 100.. never fire
    assert out["dense_features"] == int((fired / len(x) > 0.5).sum()) >= 4  # latents 0..3 always do
    assert out["dead_fraction"] == pytest.approx(out["dead_features"] / tc.d_latent)
    assert sum(out["dead_per_group"]) == out["dead_features"] and out["dead_per_group"][2] >= 28
    assert sum(out["l0_per_group"]) == pytest.approx(out["l0"])


def test_training_and_eval_count_the_same_dead_latents_on_the_same_rows(synthetic_store):
    """One counter definition: fed eval's rows under eval's rule, training's window counter finds
    exactly the latents eval calls dead; and training's observation leaves the rule's threshold alone
    when the inference rule chose the latents."""
    store = Store(synthetic_store)
    tc = random_transcoder(store)
    n = 2 * store.chunk_rows
    out = row_eval.row_metrics(tc, store, rows=n, device="cpu", dense_threshold=0.5, progress=False)
    keep = np.concatenate([store.read_chunk(c).flags == 0 for c in out["chunks"]])
    x = torch.from_numpy(np.concatenate([store.read_chunk(c).source for c in out["chunks"]])[keep]).float()
    y = torch.from_numpy(np.concatenate([store.read_chunk(c).target for c in out["chunks"]])[keep]).float()
    threshold = float(tc.sparsity.threshold)
    tc.dead_tokens = len(x)
    tc.tokens_since_fired.zero_()
    for a in range(0, len(x), 500):
        tc(tc.normalize_source(x[a:a + 500]), tc.normalize_target(y[a:a + 500]), use_threshold=True,
           update_stats=True)
    assert float(tc.sparsity.threshold) == threshold
    assert 0 < int(tc.dead_mask().sum()) == out["dead_features"] < tc.d_latent


def test_variance_explained_per_group_is_what_each_group_adds(synthetic_store):
    store = Store(synthetic_store)
    tc = random_transcoder(store)
    out = row_eval.row_metrics(tc, store, rows=2 * store.chunk_rows, device="cpu", dense_threshold=0.5,
                               progress=False)
    chunks = out["chunks"]
    keep = np.concatenate([store.read_chunk(c).flags == 0 for c in chunks])
    x = torch.from_numpy(np.concatenate([store.read_chunk(c).source for c in chunks])[keep]).float()
    y = np.concatenate([store.read_chunk(c).target for c in chunks])[keep].astype(np.float64)
    acts = tc.encode(x).numpy().astype(np.float64)
    W, b = tc.W_dec.detach().numpy().astype(np.float64), tc.b_dec.detach().numpy()
    total = ((y - y.mean(0)) ** 2).sum()
    explained, before = [], 0.0
    for m in tc.boundaries:
        pred = (acts[:, :m] @ W[:m] + b) * float(tc.target_scale) + tc.target_mean.numpy()
        now = 1 - ((y - pred) ** 2).sum() / total
        explained.append(now - before)
        before = now
    assert out["variance_explained_per_group"] == pytest.approx(explained, rel=1e-3, abs=1e-6)
    assert sum(out["variance_explained_per_group"]) == pytest.approx(1 - out["fvu"], rel=1e-6)
    live = (acts > 0).sum(0) > 0
    assert sum(out["density_log10_histogram"]["counts"]) == int(live.sum())


def test_density_histogram_bins_live_latents_by_decade_halves():
    h = row_eval.density_histogram(np.array([0.0, 1e-3, 0.02, 0.5, 1.0, 0.0]))
    edges, counts = h["log10_edges"], h["counts"]
    assert edges[0] == -7.0 and edges[-1] == 0.0 and len(counts) == len(edges) - 1 == 14
    expected = [0] * 14
    expected[8] += 1      # 1e-3: [-3, -2.5)
    expected[10] += 1     # 0.02 = 10^-1.7: [-2, -1.5)
    expected[13] += 2     # 0.5 = 10^-0.3 and 1.0 = 10^0: the last bin, closed on the right
    assert counts == expected     # the two dead latents (density 0) are in no bin


def test_pick_chunks_spreads_whole_chunks():
    assert row_eval.pick_chunks(10, 100, 250) == [0, 4, 9]
    assert row_eval.pick_chunks(10, 100, 10**9) == list(range(10))
    assert row_eval.pick_chunks(1, 100, 5) == [0]


# ----------------------------------------------------------------------------- the command

def fake_run(tmp_path: Path, store_path: Path) -> Path:
    """A run folder as `tc train` leaves it, around a hand-made transcoder (no training needed)."""
    run = tmp_path / "run"
    run.mkdir()
    random_transcoder(Store(store_path)).save(run / "transcoder.safetensors")
    (run / "config.json").write_text(json.dumps({"cache": str(store_path)}))
    return run


def test_store_row_eval_writes_json_and_png(tmp_path, synthetic_store):
    run = fake_run(tmp_path, synthetic_store)
    result = ev.run_eval(ev.EvalConfig(run=str(run), lm_loss=False, device="cpu"), progress=False)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["rows"]["fvu_per_prefix"] == result["rows"]["fvu_per_prefix"]
    assert saved["rows"]["rows_are_training_rows"] is True and "lm" not in saved
    assert saved["config"]["run"] == str(run) and "torch" in saved["versions"]
    assert (run / "eval_fvu_per_prefix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_unfinished_run_is_a_user_error(tmp_path, synthetic_store):
    with pytest.raises(UserError, match="does not exist"):
        ev.run_eval(ev.EvalConfig(run=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="no run folder given"):
        ev.run_eval(ev.EvalConfig())
    run = fake_run(tmp_path, synthetic_store)
    (run / "transcoder.safetensors").unlink()
    with pytest.raises(UserError, match="no final transcoder"):
        ev.run_eval(ev.EvalConfig(run=str(run)))


def test_unloadable_model_is_one_line_and_exit_2(tmp_path, synthetic_store):
    """The synthetic store's model ('synthetic') cannot be loaded: one line on the CLI, exit 2, nothing written."""
    import typer
    from typer.testing import CliRunner

    import cli

    run = fake_run(tmp_path, synthetic_store)
    with pytest.raises(UserError, match="cannot load model 'synthetic'") as e:
        ev.run_eval(ev.EvalConfig(run=str(run), device="cpu"), progress=False)
    assert "\n" not in str(e.value)
    app = typer.Typer()
    cli.register(app, "eval", ev.EvalConfig, ev.run_eval, "eval")
    res = CliRunner().invoke(app, ["--run", str(run), "--device", "cpu"])
    assert res.exit_code == 2
    # the store rows' bar runs beside the load (and is stopped by its failure): leave it out
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("eval: store rows")]
    # the status line printed as the load starts, then the error alone
    assert lines[0].startswith("eval: loading model synthetic")
    assert len(lines) == 2 and "cannot load model 'synthetic'" in lines[1] and "Traceback" not in res.output
    assert not (run / "eval.json").exists()


def fake_load(log: list, rows_started: threading.Event):
    """A load_eval_model stand-in that waits (up to 10 s) for the store rows to start."""
    def load(spec, store, device, dtype):
        log.append(("rows had started" if rows_started.wait(10 if dtype is None else 0.5) else "rows not started", dtype))
        return SimpleNamespace(model=SimpleNamespace(hook_dict={}))
    return load


def test_store_rows_run_while_the_model_loads(monkeypatch):
    """At the default dtype the rows start while the model loads; otherwise (HF sets torch's
    process-wide default dtype while it builds the model) only after it."""
    for dtype, want in (("auto", "rows had started"), ("bfloat16", "rows not started")):
        started, log = threading.Event(), []
        monkeypatch.setattr(ev, "load_eval_model", fake_load(log, started))

        def rows(stop):
            started.set()
            return "rows"

        cfg = ev.EvalConfig(model="tiny", dtype=dtype)
        spec, lm, out = ev.rows_beside_model(cfg, SimpleNamespace(attrs={}), [None], "cpu", rows, progress=False)
        assert (spec, out) == ("tiny", "rows") and lm is not None
        assert log == [(want, None if dtype == "auto" else torch.bfloat16)]


def test_a_failed_load_stops_the_rows_and_a_failure_in_the_rows_reaches_the_caller(monkeypatch, synthetic_store):
    stopped = threading.Event()

    def rows(stop):
        assert stop.wait(10)
        stopped.set()

    def unloadable(spec, store, device, dtype):
        raise UserError("cannot load")

    monkeypatch.setattr(ev, "load_eval_model", unloadable)
    with pytest.raises(UserError, match="cannot load"):
        ev.rows_beside_model(ev.EvalConfig(model="x"), SimpleNamespace(attrs={}), [None], "cpu", rows, progress=False)
    assert stopped.wait(10)
    started = threading.Event()
    started.set()
    monkeypatch.setattr(ev, "load_eval_model", fake_load([], started))
    with pytest.raises(ZeroDivisionError):
        ev.rows_beside_model(ev.EvalConfig(model="x"), SimpleNamespace(attrs={}), [None], "cpu", lambda stop: 1 / 0,
                             progress=False)
    # row_metrics itself ends before its next chunk once told to stop
    store = Store(synthetic_store)
    stop = threading.Event()
    stop.set()
    with pytest.raises(row_eval.Stopped):
        row_eval.row_metrics(random_transcoder(store), store, 1000, "cpu", 0.1, progress=False, stop=stop)


def test_bad_options_and_mismatched_stores_are_user_errors(tmp_path, synthetic_store):
    run = fake_run(tmp_path, synthetic_store)
    for bad in (dict(tokens=0), dict(rows=-1), dict(batch_size=0), dict(seq_len=1), dict(dense_threshold=1.5)):
        with pytest.raises(UserError):
            ev.run_eval(ev.EvalConfig(run=str(run), lm_loss=False, **bad), progress=False)
    tc = Transcoder.load(run / "transcoder.safetensors")
    tc.meta = {"hooks": {"source": "blocks.3.hook_resid_mid", "target": "blocks.3.hook_mlp_out"}}
    tc.save(run / "transcoder.safetensors")
    with pytest.raises(UserError, match="blocks.3.hook_resid_mid -> blocks.3.hook_mlp_out but the store"):
        ev.run_eval(ev.EvalConfig(run=str(run), lm_loss=False), progress=False)
    assert not (run / "eval.json").exists()


def test_text_source_defaults_to_the_stores_text():
    store = SimpleNamespace(path="s.zarr", attrs={"config": {"dataset": "org/web", "split": "train",
                                                             "dataset_config": "en", "text_column": "text"}})
    spec, same = ev.text_source(ev.EvalConfig(), store)
    assert same and spec == {"dataset": "org/web", "split": "train", "dataset_config": "en", "text_column": "text"}
    spec, same = ev.text_source(ev.EvalConfig(split="validation"), store)
    assert not same and spec["split"] == "validation" and spec["dataset_config"] == "en"
    spec, same = ev.text_source(ev.EvalConfig(dataset="notes.txt"), store)
    assert not same and spec == {"dataset": "notes.txt", "split": "train", "dataset_config": None, "text_column": "text"}


# ----------------------------------------------------------------------------- real runs

def make_run(tmp: Path, model: str, layer: int, tokens: int, seq_len: int, train: dict) -> tuple[Path, Path]:
    """A store of python-docs from `model` and a short training run on it."""
    from pipeline.cache import CacheConfig, run_cache
    from pipeline.train import TrainConfig, run_train

    store = tmp / "store.zarr"
    run_cache(CacheConfig(model=model, dataset="python-docs", layer=layer, tokens=tokens, seq_len=seq_len,
                          out=str(store), device="cpu"))
    run = run_train(TrainConfig(cache=str(store), out=str(tmp / "run"), device="cpu", sample_every=0,
                                log_every=50, checkpoint_every=10**6, **train))
    return store, Path(run)


def check_eval(result: dict, store_path: Path, run: Path, seq_len: int) -> dict:
    """What every real eval must satisfy; returns the LM section."""
    lm, rows = result["lm"], result["rows"]
    assert json.loads((run / "eval.json").read_text())["lm"]["ce_spliced"] == lm["ce_spliced"]
    assert (run / "eval_fvu_per_prefix.png").stat().st_size > 0
    for key in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero", "fraction_recovered"):
        assert math.isfinite(lm[key]), key
    assert lm["kl_spliced"] > 0 and lm["kl_zero"] > 0
    assert lm["ce_increase"] == pytest.approx(lm["ce_spliced"] - lm["ce_clean"])
    assert lm["fraction_recovered"] == pytest.approx(lm_eval.fraction_recovered(lm["ce_clean"], lm["ce_spliced"], lm["ce_zero"]))
    # held out: the store's own text, continued after every sequence the store holds
    store = Store(store_path)
    text = lm["text"]
    assert text["same_as_store"] and text["skipped_store_sequences"] == store.n_rows // store.seq_len
    assert text["tokens"] == text["sequences"] * seq_len > 0
    assert 0 < lm["n_scored_tokens"] < text["tokens"]
    # store rows
    assert rows["rows_are_training_rows"] and rows["n_rows"] > 0
    assert all(math.isfinite(v) for v in rows["fvu_per_prefix"] + rows["variance_explained_per_prefix"])
    assert 0 < rows["l0"] and 0 <= rows["dead_fraction"] < 1 and 0 <= rows["dense_fraction"] < 1
    assert sum(rows["l0_histogram"]) == rows["n_rows"]
    return lm


@pytest.fixture
def shared_model_loads(monkeypatch):
    """Cache, train and eval in one test load the same model: load it once (saves ~10-20 s each)."""
    from pipeline import models

    loaded: dict = {}
    real = models.load_model

    def load(spec, device="cpu", dtype=None):
        key = (spec, device, dtype or models.default_dtype(device))
        if key not in loaded:
            loaded[key] = real(spec, device=device, dtype=dtype)
        return loaded[key]

    monkeypatch.setattr(models, "load_model", load)


def test_eval_end_to_end_on_tiny(tmp_path, shared_model_loads):
    store, run = make_run(tmp_path, "tiny", layer=1, tokens=4096, seq_len=64,
                          train=dict(dict_size=256, groups=[32, 64, 128, 32], k=8, batch_size=256, steps=60,
                                     warmup_steps=10, lr=3e-3))
    result = ev.run_eval(ev.EvalConfig(run=str(run), tokens=1024, device="cpu"), progress=False)
    check_eval(result, store, run, seq_len=64)
    assert result["model"] == "tiny" and result["layer"] == 1


@pytest.mark.slow
def test_eval_on_gemma_3_270m_orders_clean_spliced_zero(tmp_path, shared_model_loads):
    """A short real run: 16k tokens of python-docs at layer 6, a 1,280-latent transcoder trained
    for 400 steps (training FVU about 0.12), spliced in on 512 held-out tokens."""
    store, run = make_run(tmp_path, "gemma-3-270m", layer=6, tokens=16_384, seq_len=128,
                          train=dict(dict_size=1280, groups=[160, 320, 640, 160], k=32, batch_size=512,
                                     steps=400, warmup_steps=20, lr=3e-3))
    result = ev.run_eval(ev.EvalConfig(run=str(run), tokens=512, rows=16_384, device="cpu"), progress=False)
    lm = check_eval(result, store, run, seq_len=128)
    rows = result["rows"]
    print(json.dumps({k: lm[k] for k in ("ce_clean", "ce_spliced", "ce_zero", "fraction_recovered", "kl_spliced",
                                         "kl_zero")}), json.dumps({k: rows[k] for k in ("fvu_per_prefix", "l0")}))
    assert lm["ce_clean"] <= lm["ce_spliced"] <= lm["ce_zero"]
    assert 0 < lm["fraction_recovered"] <= 1
    assert lm["kl_spliced"] < lm["kl_zero"]
    assert rows["fvu_per_prefix"][-1] < rows["fvu_per_prefix"][0] < 1   # nested prefixes: more latents, less error
