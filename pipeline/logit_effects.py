"""Logit effects: the output tokens a feature's decoder direction promotes and suppresses most.

A transcoder feature f adds `activation * W_dec[f]` to its target in normalised units; in the
model's own units that is `activation * W_dec[f] * target_scale` (the target's scalar scale,
pipeline/transcoder.py; the target mean belongs to the bias, not to the feature). Through the rest
of the model the direct path to the logits is the final norm and the unembedding. The norm divides
by a positive, input-dependent RMS (ignored: it scales every token alike) and multiplies
elementwise by its scale, so the effect is

    (W_dec[f] * target_scale * norm_scale) @ W_U          (one value per vocabulary token)

where norm_scale is the final RMSNorm's `1 + weight` for Gemma (its weights are stored centred on
zero) and `weight` for other RMSNorms. Gemma-2's final logit soft-cap is monotonic and left out.
For a Gemma `hook_mlp_out` target (after the post-feedforward norm) this is exactly the direct
effect of adding the direction to the residual stream.

Computed once at export from the model named by the store (or `--model`), so the page needs no
model; when the model cannot be loaded the export leaves them out and says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.transcoder import Transcoder
from pipeline.util import UserError, status

FEATURE_BATCH = 256          # features per product: 256 x 262k floats (Gemma 3) is ~270 MB


def raw_directions(tc: Transcoder, feats: list[int]) -> Tensor:
    """Decoder rows of `feats` in the target's raw units: (n, d_out)."""
    idx = torch.as_tensor(feats, dtype=torch.long, device=tc.W_dec.device)
    return tc.W_dec.detach()[idx].float() * tc.target_scale.float()


def norm_scale(norm: torch.nn.Module) -> Tensor:
    """The elementwise scale an RMSNorm applies after dividing by the RMS."""
    norm = getattr(norm, "_original_component", norm)       # the TransformerLens bridge wraps it
    if "rms" not in type(norm).__name__.lower():             # a LayerNorm also centres: not one scale
        raise UserError(f"the final norm is a {type(norm).__name__}, not an RMSNorm: logit effects need one")
    weight = norm.weight.detach().float()
    # Gemma's RMSNorm computes x * (1 + weight) (weights stored centred on zero), others x * weight
    return 1.0 + weight if type(norm).__name__.startswith("Gemma") else weight


def unembedding(lm: Any) -> tuple[Tensor, Tensor]:
    """(final norm scale (d,), W_U (d, vocab)) of a loaded model (pipeline.models.LoadedModel)."""
    hf = getattr(lm.model, "original_model", lm.model)
    body = getattr(hf, "model", None)
    body = hf.base_model if body is None else body
    norm = getattr(body, "norm", None)
    if norm is None or getattr(getattr(norm, "_original_component", norm), "weight", None) is None:
        raise UserError(f"model {lm.spec} has no final RMSNorm with a weight where tc looks (model.norm)")
    head = hf.get_output_embeddings()
    return norm_scale(norm), head.weight.detach().float().t()


def top_effects(directions: Tensor, scale: Tensor, w_u: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each direction (n, d): the k largest and k smallest values of (direction * scale) @ W_U
    and their token ids, largest first / most negative first: four (n, k) tensors."""
    k = min(k, w_u.shape[1])
    parts = []
    # a bar: on the demo (4k features, Gemma's 262k vocabulary) this takes a minute on a CPU
    bar = tqdm(total=len(directions), desc="export: logit effects", unit="feature")
    for a in range(0, len(directions), FEATURE_BATCH):
        logits = (directions[a:a + FEATURE_BATCH] * scale) @ w_u               # (b, vocab)
        pos, neg = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((pos.values, pos.indices, neg.values, neg.indices))
        bar.update(len(logits))
    bar.close()
    return tuple(torch.cat(p).cpu() for p in zip(*parts))                    # type: ignore[return-value]


def feature_logit_effects(tc: Transcoder, feats: list[int], lm: Any, k: int, vocab: list[str]
                          ) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """feature -> {positive: [{token_id, token, value}] (k, largest first), negative: (k, most
    negative first)}."""
    scale, w_u = unembedding(lm)
    if w_u.shape[0] != tc.d_out:
        raise UserError(f"the transcoder's target has width {tc.d_out} but model {lm.spec} has d_model "
                        f"{w_u.shape[0]}")
    if not feats:
        return {}
    directions = raw_directions(tc, feats).to(w_u.device)
    pv, pi, nv, ni = top_effects(directions, scale.to(w_u.device), w_u, k)

    def entries(vals: Tensor, ids: Tensor) -> list[dict[str, Any]]:
        return [{"token_id": int(i), "token": vocab[int(i)] if int(i) < len(vocab) else f"<id {int(i)}>",
                 "value": round(float(v), 5)} for v, i in zip(vals, ids)]
    return {f: {"positive": entries(pv[j], pi[j]), "negative": entries(nv[j], ni[j])} for j, f in enumerate(feats)}


def try_logit_effects(tc: Transcoder, feats: list[int], model: str | None, k: int, device: str = "cpu"
                      ) -> tuple[dict[int, dict] | None, dict[str, Any]]:
    """The logit effects of `feats` and what made them, or (None, {available: false, reason}) when
    the model cannot be loaded or does not fit: the export goes on without them."""
    if k <= 0:
        return None, {"available": False, "reason": "turned off (--logit-tokens 0)"}
    if not model:
        return None, {"available": False, "reason": "the store records no model"}
    from pipeline.models import load_model, model_names, vocab_strings

    if model not in model_names() and not Path(model).is_dir() and not _in_hf_cache(model):
        return None, {"available": False, "model": model,
                      "reason": f"model {model!r} is not available locally (the export never downloads a model; "
                                "pass --model NAME_OR_FOLDER)"}
    try:
        # the weights in the device's usual dtype (bf16 on a GPU); the product itself is float32
        status(f"export: loading {model} for the logit effects")
        lm = load_model(model, device)
        effects = feature_logit_effects(tc, feats, lm, k, vocab_strings(lm.tokenizer))
    except (UserError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        reason = reason if len(reason) < 240 else reason[:240] + "…"      # one readable line
        return None, {"available": False, "model": model, "reason": reason}
    return effects, {"available": True, "model": model, "hf_name": lm.hf_name, "tokens": k,
                     "formula": "(W_dec[f] * target_scale * final_norm_scale) @ W_U",
                     "target_scale": float(tc.target_scale)}



def _in_hf_cache(model: str) -> bool:
    """Whether a Hugging Face id is already in the local hub cache (its config.json)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:      # not a valid repo id, no cache: not available
        return False
