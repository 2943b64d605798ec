"""The transcoder module: sparse == dense, Matryoshka prefixes, AuxK, threshold, normalisation, file."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rewrite_as_tc_0_1_transcoder
from pipeline.store import Store
from pipeline.train import lr_at
from pipeline import transcoder as transcoder_module
from pipeline.sparsity import BatchTopK, at_least, batch_topk_indices, true_positions
from pipeline.transcoder import PrefixMSE, Transcoder, norm_constants, stable_order

DOCS = Path(__file__).resolve().parent.parent / "docs" / "transcoder.md"
GROUPS = [16, 32, 64, 16]   # d_latent 128


pytestmark = pytest.mark.usefixtures("one_thread")


def make(groups=GROUPS, k=4, d=24, seed=0, **kw) -> Transcoder:
    return Transcoder(d, d, groups, k, seed=seed, **kw)


def batch(n=64, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def store_rows(store_path, n=None):
    """Normalised (x, y) of the usable rows of a store, in store order."""
    st = Store(store_path)
    keep = st.flags == 0
    nc = norm_constants(st.stats())
    src = torch.from_numpy(st.source[:][keep].astype(np.float32))
    tgt = torch.from_numpy(st.target[:][keep].astype(np.float32))
    x = (src - nc["source_mean"]) / nc["source_scale"]
    y = (tgt - nc["target_mean"]) / nc["target_scale"]
    return (x[:n], y[:n], nc) if n else (x, y, nc)


def train_in_memory(model, x, y, steps, batch_size=256, lr=3e-3, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 20, 0.1)
        out = model(x[idx], y[idx])
        opt.zero_grad()
        out.loss.backward()
        model.project_decoder_grad()
        opt.step()
        model.normalize_decoder()
    return model


# ----------------------------------------------------------------------------- sparse vs dense

def test_batch_topk_indices_is_exact():
    g = torch.Generator().manual_seed(0)
    for n_keep, shift in [(200, 0.0), (1000, 0.0), (50, -3.0), (4000, -1.0)]:
        flat = torch.randn(64 * 100, generator=g) + shift
        got = batch_topk_indices(flat, n_keep)
        pos = flat[flat > 0]
        want_n = min(n_keep, len(pos))
        want = set(torch.topk(flat, want_n).indices.tolist()) if want_n else set()
        assert set(got.tolist()) == want
        assert torch.all(got[1:] > got[:-1])   # ascending
    # a subsample whose top is unrepresentative forces the fallback path, still exact
    flat = torch.zeros(6100)
    flat[1::61] = torch.arange(1, 101, dtype=torch.float32)   # never in the stride-61 sample
    flat[::61] = 0.5
    got = batch_topk_indices(flat, 100)
    assert set(got.tolist()) == set(torch.topk(flat, 100).indices.tolist())


def test_batch_topk_keeps_every_tie_at_the_cutoff_and_reuses_its_mask_buffer():
    # 30 values tie at the cutoff: all kept, as `flat >= n_keep-th largest` keeps them
    flat = torch.cat([torch.linspace(2, 3, 90), torch.full((30,), 1.5), -torch.rand(6000)])
    flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))]
    want = (flat >= 1.5).nonzero().squeeze(1)
    assert torch.equal(batch_topk_indices(flat, 100), want)
    # the rule's scratch mask is reused from batch to batch, resized when the batch changes
    rule, g = BatchTopK(3, per_row_batches=0), torch.Generator().manual_seed(1)
    for n in (64, 64, 40, 64):
        pre = torch.randn(n, 128, generator=g)
        assert torch.equal(rule.training_indices(pre), batch_topk_indices(pre.reshape(-1), 3 * n))


def test_at_least_is_the_float_compare():
    """The int32 bit-pattern compare equals flat >= cut for every non-NaN float and positive cut:
    negatives, both zeros, subnormals, infinities, values equal to the cut."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 1e-45,
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    flat = torch.cat([torch.randn(4000, generator=g) * 3, special])
    for cut in [0.7, 1e-40, torch.finfo(torch.float32).tiny, 2.5, float(flat.max())]:
        cut = torch.tensor(cut)
        flat_with_cut = torch.cat([flat, cut.reshape(1)])
        assert torch.equal(at_least(flat_with_cut, cut), flat_with_cut >= cut), float(cut)
        out = torch.empty(len(flat_with_cut), dtype=torch.bool)
        assert at_least(flat_with_cut, cut, out) is out and torch.equal(out, flat_with_cut >= cut)
    assert torch.equal(at_least(flat.double(), torch.tensor(0.7)), flat.double() >= 0.7)   # other dtypes


def test_stable_order_is_a_stable_argsort():
    ids = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0))
    want = np.argsort(ids.numpy(), kind="stable")
    assert np.array_equal(stable_order(ids).numpy(), want)


def test_true_positions_are_nonzero_of_the_mask():
    g = torch.Generator().manual_seed(0)
    for n, p in [(8000, 0.01), (8000, 0.5), (4096, 0.0), (64, 1.0), (8003, 0.02), (7, 0.5)]:
        mask = torch.rand(n, generator=g) < p
        assert torch.equal(true_positions(mask), mask.nonzero().squeeze(1)), (n, p)


def test_prefix_mse_and_its_gradients_equal_the_autograd_reference():
    g = torch.Generator().manual_seed(0)
    G, B, d = 4, 16, 8
    y = torch.randn(B, d, generator=g)
    for base_shape in [(B, d), (d,)]:             # b_dec plus a skip path, or b_dec alone
        for weights in [torch.ones(G), torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.rand(G, generator=g)]:
            parts = torch.randn(G, B, d, generator=g, requires_grad=True)
            base = torch.randn(*base_shape, generator=g, requires_grad=True)
            mse, err = PrefixMSE.apply(parts, base, y)
            (mse * weights).sum().backward()
            got = (mse.detach(), err, parts.grad.clone(), base.grad.clone())
            parts.grad = base.grad = None
            ref_err = y - (parts.cumsum(0) + base)
            ref = ref_err.pow(2).mean(dim=(1, 2))
            (ref * weights).sum().backward()
            torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[1], ref_err.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[2], parts.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[3], base.grad, rtol=1e-5, atol=1e-7)
            assert not err.requires_grad


@pytest.mark.parametrize("aux_k, aux_path", [(512, "dense"), (512, "sparse"), (3, "dense"), (3, "sparse")])
def test_sparse_forward_and_gradients_equal_dense_reference(monkeypatch, aux_k, aux_path):
    # AuxK's two kernels (matmuls over the dead columns, or per-pair gathers), with every dead
    # latent kept (aux_k above their number) or a per-row top-3 of them
    monkeypatch.setattr(transcoder_module, "AUX_DENSE_DENSITY", 0.0 if aux_path == "dense" else 2.0)
    sparse = make(dead_tokens=10, aux_k=aux_k)
    sparse.tokens_since_fired[::3] = 100   # a third of the latents are dead: AuxK is active
    dense = copy.deepcopy(sparse)
    dense.dense = True
    x, y = batch()
    outs = []
    for m in (sparse, dense):
        out = m(x, y, update_stats=False)
        out.loss.backward()
        outs.append(out)
    a, b = outs
    assert a.aux_loss > 0
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mse, b.mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.pred, b.pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ga, gb = getattr(sparse, name).grad, getattr(dense, name).grad
        assert gb.abs().max() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_batch_topk_keeps_k_per_row_on_average_and_the_largest():
    m = make(k=None, sparsity=BatchTopK(4, per_row_batches=0))
    x, y = batch(n=64)
    out = m(x, y, update_stats=False)
    assert len(out.cols) == m.k * 64
    pre = torch.relu(m.normalize_source(x) @ m.W_enc.detach().T + m.b_enc.detach())
    kept = torch.zeros_like(pre, dtype=torch.bool)
    kept[out.rows, out.cols] = True
    assert pre[kept].min() >= pre[~kept].max()
    # rows are sorted by (group, row): the collector can rely on it
    group = m.group_of(out.cols)
    key = group * 64 + out.rows
    assert torch.all(key[1:] >= key[:-1])


# ----------------------------------------------------------------------------- Matryoshka

def test_each_prefix_term_reaches_exactly_its_prefix():
    m = make()
    x, y = batch()
    ends = m.boundaries
    for i, end in enumerate(ends):
        m.zero_grad()
        out = m(x, y, update_stats=False)
        out.mse[i].backward()
        # only latents < m_i get gradient, in the decoder and in the encoder
        assert m.W_dec.grad[end:].abs().max() == 0 if end < m.d_latent else True
        assert m.W_enc.grad[end:].abs().max() == 0 if end < m.d_latent else True
        start = 0 if i == 0 else ends[i - 1]
        assert m.W_dec.grad[start:end].abs().sum() > 0   # group i itself moves
        assert m.b_dec.grad.abs().sum() > 0
    # the total loss is not just the full-width term: group 1 gets more gradient than from it alone
    m.zero_grad()
    m(x, y, update_stats=False).mse[-1].backward()
    last_only = m.W_dec.grad[: ends[0]].clone()
    m.zero_grad()
    m(x, y, update_stats=False).loss.backward()
    total = m.W_dec.grad[: ends[0]] * len(ends)   # loss = mean over G prefixes
    assert (total - last_only).abs().max() > 1e-3 * last_only.abs().max()


def skewed_rows(n=8000, d=32, n_features=64, seed=0):
    """Sparse codes whose features differ in frequency (Zipf) and size (exponential decay), as in
    real activations: a few features carry most of the variance. x and y use different directions."""
    g = torch.Generator().manual_seed(seed)
    enc, dec = torch.randn(n_features, d, generator=g), torch.randn(n_features, d, generator=g)
    p = 1 / torch.arange(1, n_features + 1).float()
    p = (p / p.sum() * 4).clamp(max=0.9)                       # about 4 features per row
    size = torch.exp(-0.05 * torch.arange(n_features).float())
    codes = (torch.rand(n, n_features, generator=g) < p) * torch.empty(n, n_features).uniform_(0.5, 2, generator=g) * size
    x = codes @ enc + 0.01 * torch.randn(n, d, generator=g)
    y = codes @ dec
    norm = lambda v: (v - v.mean(0)) / (v.var(0).sum() / d).sqrt()   # noqa: E731
    return norm(x), norm(y)


def test_nested_loss_makes_the_first_group_a_good_transcoder_alone():
    x, y = skewed_rows()
    groups = [8, 24, 96, 128]
    nested = train_in_memory(make(groups, k=4, d=32), x[:6000], y[:6000], steps=300)
    plain = train_in_memory(make([sum(groups)], k=4, d=32), x[:6000], y[:6000], steps=300)
    plain.set_groups(groups)   # read the plain run's first 8 latents as a prefix too
    with torch.no_grad():
        f_nested = nested(x[6000:], y[6000:], update_stats=False).fvu_levels
        f_plain = plain(x[6000:], y[6000:], update_stats=False).fvu_levels
    # measured: about 0.43 vs 0.63 for the first 8 latents; full width 0.21 vs 0.24
    assert f_nested[0] < 0.8 * f_plain[0] and f_nested[0] < f_plain[0] - 0.1, (f_nested, f_plain)
    assert f_nested[-1] < f_plain[-1] + 0.1, (f_nested, f_plain)   # the full width stays as good


# ----------------------------------------------------------------------------- AuxK

def test_aux_loss_trains_only_dead_latents_on_a_detached_residual():
    m = make(dead_tokens=10)
    dead = torch.zeros(m.d_latent, dtype=torch.bool)
    dead[1::2] = True
    m.tokens_since_fired[dead] = 100
    x, y = batch()
    out = m(x, y, update_stats=False)
    assert out.aux_loss > 0
    out.aux_loss.backward()
    live = ~dead
    # the residual is detached: nothing of the main path (live latents, b_dec) gets aux gradient
    assert m.W_dec.grad[live].abs().max() == 0
    assert m.W_enc.grad[live].abs().max() == 0
    assert m.b_enc.grad[live].abs().max() == 0
    assert m.b_dec.grad is None or m.b_dec.grad.abs().max() == 0
    assert m.W_dec.grad[dead].abs().sum() > 0 and m.W_enc.grad[dead].abs().sum() > 0
    # and it is the loss of reconstructing (y - prediction) from dead latents only
    m2 = copy.deepcopy(m)
    m2.tokens_since_fired.zero_()
    assert m2(x, y, update_stats=False).aux_loss == 0


def test_dead_counter_follows_the_window():
    m = make(dead_tokens=200)
    x, y = batch(n=64)
    m.train()
    for _ in range(4):   # 256 tokens: latents never picked in these batches are dead
        out = m(x, y)
    fired = torch.zeros(m.d_latent, dtype=torch.bool)
    fired[out.cols] = True
    assert not m.dead_mask()[fired].any()
    assert int(m.tokens_since_fired.max()) == 256
    assert torch.equal(m.dead_mask(), m.tokens_since_fired >= 200)


# ----------------------------------------------------------------------------- inference

def test_threshold_encoding_does_not_depend_on_the_batch(synthetic_store):
    x, y, nc = store_rows(synthetic_store, n=4096)
    m = train_in_memory(make([64, 64], k=4, d=32), x, y, steps=60)
    assert m.sparsity.threshold > 0
    m.set_normalization(nc["source_mean"], nc["source_scale"], nc["target_mean"], nc["target_scale"])
    raw = x * nc["source_scale"] + nc["source_mean"]
    whole = m.encode(raw[:200])
    for i in (0, 17, 199):
        alone = m.encode(raw[i:i + 1])[0]
        assert torch.equal(alone > 0, whole[i] > 0)
        torch.testing.assert_close(alone, whole[i], rtol=1e-5, atol=1e-5)
    other = m.encode(torch.cat([raw[1000:1100], raw[17:18]]))[-1]   # other neighbours
    torch.testing.assert_close(other, whole[17], rtol=1e-5, atol=1e-5)
    # the threshold was estimated so that inference L0 is near k on training data
    l0 = (m.encode(raw) > 0).sum(1).float().mean()
    assert 0.75 * m.k < l0 < 1.33 * m.k, l0


def test_prediction_is_denormalised_with_the_target_statistics():
    d = 8
    m = make([16], k=3, d=d)
    with torch.no_grad():
        m.b_dec.normal_()
        m.sparsity.threshold.fill_(0.05)
    m.set_normalization(torch.full((d,), 100.0), 50.0, torch.full((d,), -7.0), 0.01)
    x_raw = 100 + 50 * torch.randn(32, d)
    acts = m.encode(x_raw)
    want = (acts @ m.W_dec.detach() + m.b_dec.detach()) * 0.01 - 7.0
    got = m.predict(x_raw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # with the source's constants it would be a hundred times off and centred on 100
    assert got.mean().item() == pytest.approx(-7.0, abs=1.0)
    assert torch.allclose(m.normalize_target(got), acts @ m.W_dec.detach() + m.b_dec.detach(), atol=1e-3)


def test_normalisation_constants_give_unit_mean_square_per_dim(synthetic_store):
    x, y, _ = store_rows(synthetic_store)
    for v in (x, y):
        assert v.pow(2).sum(1).mean().item() == pytest.approx(v.shape[1], rel=0.02)
        assert v.mean(0).abs().max() < 0.05


def test_decoder_rows_stay_unit_norm_after_steps(synthetic_store):
    x, y, _ = store_rows(synthetic_store, n=2048)
    m = train_in_memory(make([32, 32], k=4, d=32), x, y, steps=10)
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(m.d_latent))


# ----------------------------------------------------------------------------- the file

def test_save_load_and_plain_snippet_predict_the_same(tmp_path):
    m = make([8, 24], k=3, d=12, meta={"model": "m", "layer": 3,
                                       "hooks": {"source": "blocks.3.hook_resid_mid", "target": "blocks.3.hook_mlp_out"}})
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.b_dec.normal_()
        m.sparsity.threshold.fill_(0.2)
    m.set_normalization(torch.randn(12) * 5, 3.0, torch.randn(12), 0.5)
    path = tmp_path / "t.safetensors"
    m.save(path)
    back = Transcoder.load(path)
    assert back.groups == [8, 24] and back.k == 3 and back.meta["hooks"]["source"] == "blocks.3.hook_resid_mid"
    for name, tensor in back.state_dict().items():
        if name != "tokens_since_fired":
            assert torch.equal(tensor, m.state_dict()[name]), name
    x = torch.randn(40, 12) * 5
    want = m.predict(x)
    torch.testing.assert_close(back.predict(x), want)
    # the documented 10-line loader, run as written, with plain torch + safetensors
    text = DOCS.read_text()
    code = re.search(r"<!-- plain-loader -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope = {"path": str(path)}
    exec(code, scope)
    torch.testing.assert_close(scope["predict"](x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scope["encode"](x), m.encode(x))
    assert json.loads(scope["meta"]["groups"]) == [8, 24] and scope["meta"]["k"] == "3"
    # a skip transcoder through the same snippet
    with torch.no_grad():
        m.W_skip = torch.nn.Parameter(torch.randn(12, 12))
    m.save(path)
    scope = {"path": str(path)}
    exec(code, scope)
    assert Transcoder.load(path).skip
    torch.testing.assert_close(scope["predict"](x), m.predict(x), rtol=1e-5, atol=1e-4)


def test_load_refuses_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    from pipeline.util import UserError

    save_file({"W": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(UserError, match="not a tc-transcoder"):
        Transcoder.load(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="no transcoder"):
        Transcoder.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- the gradient, exactly

def test_total_gradient_is_the_mean_of_the_prefix_gradients():
    """loss = mean of the G prefix MSEs (no AuxK while nothing is dead): its gradient must equal the
    mean of the per-prefix gradients, parameter by parameter, not just the full-width term's."""
    m = make()
    x, y = batch()
    per_prefix = []
    for i in range(len(m.groups)):
        m.zero_grad()
        m(x, y, update_stats=False).mse[i].backward()
        per_prefix.append({n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad()
    out = m(x, y, update_stats=False)
    assert float(out.aux_loss) == 0.0
    out.loss.backward()
    for name, p in m.named_parameters():
        expected = torch.stack([g[name] for g in per_prefix]).mean(0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("chunk", [transcoder_module.PROJECT_CHUNK, 48])   # 48: blocks of 128 rows, a short last one
def test_decoder_gradient_projection_removes_the_radial_part(monkeypatch, chunk):
    """After project_decoder_grad, each decoder row's gradient is orthogonal to the row (a step cannot
    change its norm to first order), and the tangential part is left as it was."""
    monkeypatch.setattr(transcoder_module, "PROJECT_CHUNK", chunk)
    m = make()
    x, y = batch()
    m(x, y, update_stats=False).loss.backward()
    before = m.W_dec.grad.clone()
    w = m.W_dec.detach()
    radial = (before * w).sum(-1)                                   # (L,) component along each row
    assert radial.abs().max() > 1e-4                                # there is something to remove
    m.project_decoder_grad()
    after = m.W_dec.grad
    assert (after * w).sum(-1).abs().max() < 1e-6 * before.abs().max()
    torch.testing.assert_close(after, before - radial[:, None] * w)


# ----------------------------------------------------------------------------- the sparsity rule and old files

def test_the_file_records_the_sparsity_rule_and_version_1_files_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    m = make()
    m.sparsity.threshold.fill_(0.3)
    m.save(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "2" and json.loads(meta["sparsity"]) == {"rule": "batchtopk", "k": 4,
                                                                               "per_row_batches": 30}
    old = Transcoder.load(rewrite_as_tc_0_1_transcoder(tmp_path / "v2.safetensors", tmp_path / "v1.safetensors"))
    assert old.k == 4 and float(old.sparsity.threshold) == pytest.approx(0.3)
    assert old.sparsity.per_row_batches == 0       # trained before the per-row start: recorded as such
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(3)) * 3
    torch.testing.assert_close(old.predict(x), m.eval().predict(x))
    save_file(load_file(str(tmp_path / "v2.safetensors")), str(tmp_path / "v9.safetensors"),
              metadata={**meta, "format_version": "9"})
    from pipeline.util import UserError
    with pytest.raises(UserError, match="v9"):
        Transcoder.load(tmp_path / "v9.safetensors")


def test_predict_is_the_last_prefix_of_predict_prefixes_and_matches_forward(synthetic_store):
    """One decode for every consumer: the inference predictions equal what forward() computes with
    the threshold rule on the same rows (in normalised units), prefix by prefix."""
    x, y, nc = store_rows(synthetic_store, n=512)
    m = train_in_memory(make(d=x.shape[1]), x, y, steps=30).eval()
    m.set_normalization(nc["source_mean"], nc["source_scale"], nc["target_mean"], nc["target_scale"])
    x_raw = x * nc["source_scale"] + nc["source_mean"]
    preds, rows, cols = m.predict_prefixes(x_raw)
    out = m(x, y, use_threshold=True, update_stats=False)
    y_n_pred = (preds - nc["target_mean"]) / nc["target_scale"]
    torch.testing.assert_close(y_n_pred[-1], out.pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.predict(x_raw), preds[-1])
    err = (y.unsqueeze(0) - y_n_pred).pow(2).sum(dim=(1, 2)) / (y - y.mean(0)).pow(2).sum()
    torch.testing.assert_close(err, out.fvu_levels, rtol=1e-4, atol=1e-5)


def test_topk_rule_keeps_each_rows_own_k_largest_and_survives_the_file(tmp_path):
    from pipeline.sparsity import TopK

    m = make(k=None, sparsity=TopK(4), seed=2)
    x, y = batch(n=48)
    x[0] *= 20                                   # a loud row takes no more than its own k
    out = m(x, y, update_stats=False)
    pre = m.normalize_source(x) @ m.W_enc.detach().T + m.b_enc.detach()
    kept = torch.zeros_like(pre, dtype=torch.bool)
    kept[out.rows, out.cols] = True
    positives = (pre > 0).sum(1)
    assert torch.equal(kept.sum(1), positives.clamp(max=4))
    for r in range(48):                          # each row's kept ones are its largest
        if kept[r].any() and (~kept[r]).any():
            assert pre[r][kept[r]].min() >= pre[r][~kept[r]].max()
    # inference is the same rule, independent of the batch
    acts = m.encode(x)
    torch.testing.assert_close(acts[5:6], m.encode(x[5:6]))
    assert torch.equal(acts > 0, kept & (pre > 0))
    # a row with fewer than k positive pre-activations keeps only those
    with torch.no_grad():
        m.b_enc[2:] -= 1000.0
    few = m(x, y, update_stats=False)
    assert len(few.cols) > 0 and set(few.cols.tolist()) <= {0, 1}
    with torch.no_grad():
        m.b_enc[2:] += 1000.0
    m.save(tmp_path / "topk.safetensors")
    back = Transcoder.load(tmp_path / "topk.safetensors")
    assert back.sparsity.spec() == {"rule": "topk", "k": 4}
    torch.testing.assert_close(back.predict(x), m.predict(x))


def test_batch_topk_starts_per_row_then_shares_the_budget_and_learns_the_batch_cutoff():
    """BatchTopK's first per_row_batches training batches keep each row's own k (a loud row takes no
    more), the threshold learning the cutoff the batch-wide rule would have used; then the budget
    is shared across the batch again."""
    m = make(k=None, sparsity=BatchTopK(4, per_row_batches=2), seed=2)
    x, y = batch(n=48)
    x[0] *= 20
    pre = m.normalize_source(x) @ m.W_enc.detach().T + m.b_enc.detach()
    batch_cut = pre.reshape(-1).topk(4 * 48).values.min()
    for step in range(3):
        out = m(x, y)                                   # training mode: the rule learns
        per_row = torch.bincount(out.rows, minlength=48)
        if step < 2:
            assert torch.equal(per_row, torch.full((48,), 4)), step
            torch.testing.assert_close(m.sparsity.threshold, batch_cut)   # the same weights each time
        else:
            assert per_row[0] > 4 and len(out.cols) == 4 * 48
    assert int(m.sparsity.updates) == 3
    # a rule that starts batch-wide (per_row_batches 0) gives the loud row more from the first batch
    m0 = make(k=None, sparsity=BatchTopK(4, per_row_batches=0), seed=2)
    assert torch.bincount(m0(x, y).rows, minlength=48)[0] > 4
