"""The truncated forward pass: run the model up to one layer and read hook activations.

The model runs only until the last requested hook has fired (for the default pair,
``hook_resid_mid`` and ``hook_mlp_out`` of block L, that is the end of block L's MLP). A hook
then raises an exception that ends the forward, so the later blocks and the unembedding (most
of the FLOPs with a 256k vocabulary) never run, for any layer, the last one included.
``run_with_cache(stop_at_layer=L+1)`` does the same work for L < n_layers - 1 and measured
the same speed (bench/forward_paths.py), but it runs the unembedding when L is the last layer
and rebuilds the bridge's hook alias table on every call.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from pipeline.models import LoadedModel
from pipeline.util import UserError

# Block hooks a transcoder would read or predict, listed in error messages; any other full name
# in the bridge's hook_dict (attention internals, norms) is accepted too.
COMMON_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_in", "hook_mlp_out",
                "hook_attn_out"]


class _Done(Exception):
    """Raised from a hook once every requested activation is captured, to end the forward."""


def hook_name(layer: int, hook: str) -> str:
    """'hook_resid_mid' -> 'blocks.{layer}.hook_resid_mid'; a full 'blocks.N.…' name is kept as is."""
    if hook.startswith("blocks."):
        return hook
    return f"blocks.{layer}.{hook}"


def check_hooks(lm: LoadedModel, layer: int, hooks: list[str]) -> list[str]:
    """Full hook names for `hooks` at `layer`; UserError for a bad layer or an unknown hook."""
    if not 0 <= layer < lm.n_layers:
        raise UserError(f"layer {layer} is out of range: {lm.spec} has layers 0..{lm.n_layers - 1}")
    hook_dict = lm.model.hook_dict
    names = []
    for hook in hooks:
        name = hook_name(layer, hook)
        m = re.match(r"blocks\.(\d+)\.", name)
        if m and int(m.group(1)) != layer:
            raise UserError(f"hook {name} is not in layer {layer}: give the hook without the 'blocks.N.' "
                            f"prefix, or use --layer {m.group(1)}")
        if name not in hook_dict:
            valid = ", ".join(h for h in COMMON_HOOKS if f"blocks.{layer}.{h}" in hook_dict)
            raise UserError(f"unknown hook {hook!r} for {lm.spec}: use one of {valid} "
                            f"(or any full name in the model's hook_dict)")
        names.append(name)
    return names


def _hook_points(lm: LoadedModel, layer: int, hooks: list[str]) -> dict[str, Any]:
    """{full name: HookPoint}, cached on the model (hook_dict rebuilds a table on every access)."""
    cache = lm.model.__dict__.setdefault("_tc_hook_points", {})
    key = (layer, tuple(hooks))
    if key not in cache:
        hook_dict = lm.model.hook_dict
        cache[key] = {name: hook_dict[name] for name in check_hooks(lm, layer, hooks)}
    return cache[key]


@torch.no_grad()
def forward_hooks(lm: LoadedModel, tokens: torch.Tensor, layer: int, hooks: list[str],
                  on_device: bool = False) -> dict[str, torch.Tensor]:
    """Activations of `hooks` at `layer` for `tokens` (B, T) int64: {full name: float32 CPU (B, T, d_model)},
    or with `on_device`, as the model made them (its device and dtype).

    Tokens go in as a tensor, so the bridge adds no BOS of its own: position 0 is whatever the
    caller put there. One forward reads every hook, and stops as soon as the last one fires.
    """
    return _capture(lm, tokens, _hook_points(lm, layer, hooks), on_device)


def check_layer_hooks(lm: LoadedModel, layers: list[int], hooks: list[str]) -> dict[int, list[str]]:
    """{layer: full names of `hooks` at that layer}; one line for a bad layer or hook."""
    return {layer: check_hooks(lm, layer, hooks) for layer in layers}


@torch.no_grad()
def forward_layers(lm: LoadedModel, tokens: torch.Tensor, layers: list[int], hooks: list[str],
                   on_device: bool = False) -> dict[str, torch.Tensor]:
    """`forward_hooks` for the same hooks in several layers, in ONE forward that stops once the last
    of them has fired (after the highest layer's last hook): {full name: activations}."""
    points: dict[str, Any] = {}
    for layer in layers:
        points.update(_hook_points(lm, layer, hooks))
    return _capture(lm, tokens, points, on_device)


def _capture(lm: LoadedModel, tokens: torch.Tensor, points: dict[str, Any], on_device: bool) -> dict[str, torch.Tensor]:
    """Run the model on `tokens` until every hook point in `points` has fired; their activations."""
    # Two names may be aliases of one hook point: capture each point once.
    unique = {id(p): p for p in points.values()}
    captured: dict[int, torch.Tensor] = {}

    def make(point_id: int):
        def grab(tensor: torch.Tensor, hook: Any) -> None:
            captured[point_id] = tensor.detach()
            if len(captured) == len(unique):
                raise _Done

        return grab

    handles = [(p, p.add_hook(make(pid))) for pid, p in unique.items()]
    try:
        lm.model(tokens.to(lm.device), return_type=None, use_cache=False)
    except _Done:
        pass
    finally:
        for point, handle in handles:
            handle.hook.remove()
            point.fwd_hooks.remove(handle)
    if len(captured) != len(unique):
        missing = [n for n, p in points.items() if id(p) not in captured]
        raise RuntimeError(f"hooks did not fire during the forward: {missing}")
    if on_device:
        return {name: captured[id(p)] for name, p in points.items()}
    return {name: captured[id(p)].float().cpu() for name, p in points.items()}
