"""The truncated forward: right hooks, right values, no BOS added, nothing left behind."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.forward import check_hooks, forward_hooks, hook_name
from pipeline.models import load_model
from pipeline.text import iter_documents, pack_sequences
from pipeline.util import UserError

HOOKS = ["hook_resid_mid", "hook_mlp_out", "hook_resid_post"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _text_tokens(lm, n_seqs: int, seq_len: int) -> torch.Tensor:
    rows = pack_sequences(itertools.islice(iter_documents("python-docs"), 20), lm.tokenizer, seq_len, lm.bos_id)
    return torch.from_numpy(np.stack([next(rows) for _ in range(n_seqs)]))


def _assert_resid_identity(out: dict, layer: int) -> None:
    mid, mlp, post = (out[f"blocks.{layer}.{h}"] for h in HOOKS)
    assert mlp.abs().max() > 0 and not torch.allclose(post, mid)  # the MLP really contributed
    torch.testing.assert_close(post, mid + mlp, rtol=1e-6, atol=1e-6 * post.abs().max().item())


@pytest.mark.parametrize("layer", [0, 1, 3])  # 3 is the last layer: nothing after it to stop at
def test_resid_post_is_resid_mid_plus_mlp_out_on_tiny(tiny, layer):
    tokens = _text_tokens(tiny, 3, 64)
    out = forward_hooks(tiny, tokens, layer, HOOKS)
    assert set(out) == {f"blocks.{layer}.{h}" for h in HOOKS}
    for value in out.values():
        assert value.shape == (3, 64, tiny.d_model) and value.dtype == torch.float32 and value.device.type == "cpu"
    _assert_resid_identity(out, layer)


def test_truncated_forward_equals_full_forward(tiny):
    tokens = _text_tokens(tiny, 2, 32)
    names = check_hooks(tiny, 1, ["hook_resid_mid", "hook_mlp_out"])
    out = forward_hooks(tiny, tokens, 1, names)
    with torch.no_grad():
        _, cache = tiny.model.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(out[name], cache[name].float(), rtol=0, atol=0)


def test_no_bos_is_added_and_rows_are_independent(tiny):
    tokens = _text_tokens(tiny, 2, 32)
    tokens[1, 0] = 100  # a row that does not start with BOS must stay so
    out = forward_hooks(tiny, tokens, 0, ["hook_resid_pre"])["blocks.0.hook_resid_pre"]
    assert out.shape == (2, 32, tiny.d_model)
    # Gemma's residual stream starts as the token embedding times sqrt(d_model).
    embed = tiny.model.original_model.get_input_embeddings().weight
    torch.testing.assert_close(out[1, 0], embed[100] * tiny.d_model ** 0.5)
    alone = forward_hooks(tiny, tokens[1:], 0, ["hook_resid_pre"])["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(alone[0], out[1])


def test_hooks_are_removed_even_after_an_error(tiny):
    tokens = _text_tokens(tiny, 1, 16)
    forward_hooks(tiny, tokens, 2, HOOKS)
    with pytest.raises(Exception):
        forward_hooks(tiny, tokens.float(), 2, HOOKS)  # float ids: the model fails mid-forward
    assert all(not point.fwd_hooks for point in tiny.model.hook_dict.values())
    again = forward_hooks(tiny, tokens, 2, HOOKS)  # and the model still works
    _assert_resid_identity(again, 2)


def test_hook_names():
    assert hook_name(8, "hook_resid_mid") == "blocks.8.hook_resid_mid"
    assert hook_name(8, "blocks.8.hook_mlp_out") == "blocks.8.hook_mlp_out"


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_layer_out_of_range(tiny, layer):
    with pytest.raises(UserError, match=r"layers 0\.\.3"):
        check_hooks(tiny, layer, ["hook_resid_mid"])


def test_unknown_hook_lists_valid_ones(tiny):
    with pytest.raises(UserError, match="hook_resid_mid") as err:
        check_hooks(tiny, 1, ["hook_mlp_outt"])
    assert "hook_mlp_outt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not in layer 1"):
        check_hooks(tiny, 1, ["blocks.2.hook_mlp_out"])
    assert check_hooks(tiny, 1, ["blocks.1.mlp.hook_out"]) == ["blocks.1.mlp.hook_out"]


@pytest.mark.slow
def test_resid_post_is_resid_mid_plus_mlp_out_on_gemma3_270m():
    lm = load_model("gemma-3-270m")
    tokens = _text_tokens(lm, 2, 48)
    out = forward_hooks(lm, tokens, 6, HOOKS)
    assert out["blocks.6.hook_resid_mid"].shape == (2, 48, 640)
    _assert_resid_identity(out, 6)
