"""Skip transcoders: W_skip (d_out x d_in, zero at init) is trained with the rest, enters every
Matryoshka prefix, is saved in the file and honoured by every prediction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.transcoder import Transcoder
from test_transcoder import train_in_memory

GROUPS = [8, 16, 8]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(skip=True, seed=0, d_in=12, d_out=10, **kw) -> Transcoder:
    return Transcoder(d_in, d_out, GROUPS, 3, seed=seed, skip=skip, **kw)


def rows(n=48, d_in=12, d_out=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def test_skip_starts_at_zero_so_the_first_step_equals_a_plain_transcoder():
    x, y = rows()
    plain, skip = make(skip=False), make(skip=True)
    assert skip.W_skip.shape == (10, 12) and not skip.W_skip.any()
    a, b = plain(x, y), skip(x, y)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.fvu_levels, b.fvu_levels)


def test_skip_gradient_matches_the_dense_reference_and_the_closed_form():
    x, y = rows()
    sparse, dense = make(), make(dense=True)
    with torch.no_grad():
        for m in (sparse, dense):
            m.W_skip.copy_(0.1 * torch.randn(10, 12, generator=torch.Generator().manual_seed(3)))
    outs = [m(x, y) for m in (sparse, dense)]
    for o in outs:
        o.loss.backward()
    torch.testing.assert_close(sparse.W_skip.grad, dense.W_skip.grad, rtol=1e-4, atol=1e-6)
    # loss = mean over prefixes of mean((y - pred_i)^2): dL/dW_skip = -2/(G B d) sum_i (y - pred_i)^T x
    G, B, d = len(GROUPS), x.shape[0], y.shape[1]
    o = outs[0]
    with torch.no_grad():   # every prefix's training prediction, from the forward's own active set
        preds = sparse.decode_prefixes(o.rows, o.cols, o.vals, B, x_n=x)   # (G, B, d_out)
    torch.testing.assert_close(preds[-1], o.pred)
    expected = -2.0 / (G * B * d) * sum((y - preds[i]).t() @ x for i in range(G))
    torch.testing.assert_close(sparse.W_skip.grad, expected, rtol=1e-4, atol=1e-6)


def test_every_prefix_includes_the_skip_path():
    x, _ = rows()
    model = make()
    before = model.predict_prefixes(x)[0]
    with torch.no_grad():
        model.W_skip.copy_(torch.randn(10, 12, generator=torch.Generator().manual_seed(4)))
    after = model.predict_prefixes(x)[0]
    linear = x @ model.W_skip.t()                       # unit statistics: raw = normalised
    for i in range(len(GROUPS)):
        torch.testing.assert_close(after[i] - before[i], linear, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.predict(x), after[-1], rtol=1e-5, atol=1e-5)
    # activations do not depend on it (samples and the browser read these)
    torch.testing.assert_close(model.encode(x), make().encode(x))


def test_skip_transcoder_learns_a_linear_map_a_plain_one_cannot_at_this_l0():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 12, generator=g)
    y = x @ torch.randn(12, 10, generator=g)             # dense linear target: k=3 latents cannot span it
    fvu = {}
    for skip in (False, True):
        model = train_in_memory(make(skip=skip), x, y, steps=400, lr=1e-2)
        model.eval()
        err = (model.predict(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        fvu[skip] = float(err)
    assert fvu[True] < 0.05 < fvu[False]


def test_the_file_keeps_the_skip_path_and_plain_files_have_none(tmp_path):
    model = make()
    with torch.no_grad():
        model.W_skip.copy_(torch.randn(10, 12))
        model.sparsity.threshold.fill_(0.2)
    model.save(tmp_path / "s.safetensors")
    back = Transcoder.load(tmp_path / "s.safetensors")
    assert back.skip
    x, _ = rows()
    torch.testing.assert_close(back.predict(x), model.predict(x))
    make(skip=False).save(tmp_path / "p.safetensors")
    plain = Transcoder.load(tmp_path / "p.safetensors")
    assert not plain.skip and plain.W_skip is None
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert "W_skip" not in f.keys()
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert np.array_equal(f.get_tensor("W_skip").numpy(), model.W_skip.detach().numpy())
