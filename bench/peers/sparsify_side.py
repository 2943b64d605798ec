"""The sparsify half of the transcoder benchmark. Runs ONLY inside the sparsify virtual environment.

`transcoders.py` (in tc's environment) writes the rows, the row order, the learning rate of every
step and tc's normalisation constants as .npy files into one folder, then starts this script with
the sparsify venv's python; tc never imports sparsify and this script never imports tc.

    python sparsify_side.py --data DIR --json OUT.json [--num-latents 5120 --k 48 ...]

What it trains: sparsify's `SparseCoder` with `transcode=True` (source -> target, per-token TopK),
from precomputed rows. sparsify's own `Trainer` cannot be used: it only trains from a live
Hugging Face model's forward hooks. So this loop repeats what `Trainer.fit` does for one sparse coder
with loss_fn="fvu" (sparsify 1.3.3, read from its source):
- seed with torch.manual_seed(seed) right before building the coder;
- on the first batch, set the encoder bias to -mean(source) @ W_enc.T and b_dec to mean(target)
  ("centred pre-activations at init");
- loss = fvu + auxk_alpha * auxk_loss, both from SparseCoder.forward with the dead mask
  (tokens since fired > dead_feature_threshold; no mask at all when auxk_alpha is 0);
- for a transcoder it neither renormalises the decoder nor removes the parallel gradient (the
  Trainer does both only when not transcoding);
- after each step: every latent's tokens-since-fired grows by the batch's tokens and is reset for
  the latents in the batch's top-k indices.
The optimiser is plain torch.optim.Adam (what sparsify's Trainer uses without bitsandbytes) with the
learning rate of each step handed in by the driver (tc's schedule), in place of sparsify's
linear-warmup/linear-decay scheduler.

Writes into DIR: pred.npy (held-out predictions, raw target units, float32), l0.npy (active latents
per held-out row), ever_active.npy (latents active on any held-out row), and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

START = time.perf_counter()
# no Triton on a CPU machine; sparsify's eager embedding-bag decoder is the CPU path anyway
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train sparsify's SparseCoder as a transcoder on given rows.")
    p.add_argument("--data", required=True, help="folder with the driver's .npy files; outputs go here too")
    p.add_argument("--json", required=True)
    p.add_argument("--num-latents", type=int, default=5120)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=100_000, help="sparsify's dead_feature_threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch", type=int, default=4096)
    return p.parse_args(argv)


class Rows:
    """The driver's files: raw fp16 rows and tc's normalisation constants (normalised per batch, in
    float32, the way tc's loader does it)."""

    def __init__(self, folder: Path):
        load = lambda name: np.load(folder / f"{name}.npy")   # noqa: E731
        self.source, self.target = load("train_source"), load("train_target")
        self.order, self.lr = load("order"), load("lr")
        self.heldout = load("heldout_source")
        norm = json.loads((folder / "norm.json").read_text())
        self.source_mean = torch.from_numpy(load("source_mean")).float()
        self.target_mean = torch.from_numpy(load("target_mean")).float()
        self.source_scale, self.target_scale = float(norm["source_scale"]), float(norm["target_scale"])

    def norm_source(self, raw: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(raw).float() - self.source_mean) / self.source_scale

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order[step * size:(step + 1) * size]
        y = (torch.from_numpy(self.target[idx]).float() - self.target_mean) / self.target_scale
        return self.norm_source(self.source[idx]), y


def build_coder(d: int, a: argparse.Namespace):
    from sparsify import SparseCoder, SparseCoderConfig

    cfg = SparseCoderConfig(activation="topk", num_latents=a.num_latents, k=a.k, transcode=True)
    torch.manual_seed(a.seed)   # the Trainer seeds right before each coder is built
    return SparseCoder(d, cfg, device="cpu", dtype=torch.float32), cfg


@torch.no_grad()
def centre_biases(coder, x: torch.Tensor, y: torch.Tensor) -> None:
    """sparsify's first-batch init for a transcoder: pre-activations centred, b_dec = target mean."""
    coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
    coder.b_dec.data = y.mean(0)


def train(coder, rows: Rows, a: argparse.Namespace) -> dict:
    steps = len(rows.lr)
    opt = torch.optim.Adam(coder.parameters(), lr=float(rows.lr[0]))
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)
    step_s, fvu, aux, dead = [], [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = rows.batch(step, a.batch_size)
        if step == 0:
            centre_biases(coder, x, y)
        for group in opt.param_groups:
            group["lr"] = float(rows.lr[step])
        dead_mask = since_fired > a.dead_tokens if a.auxk_alpha > 0 else None
        out = coder(x, y, dead_mask=dead_mask)
        loss = out.fvu + a.auxk_alpha * out.auxk_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[out.latent_indices.flatten()] = 0
        step_s.append(time.perf_counter() - t0)
        fvu.append(float(out.fvu))
        aux.append(float(out.auxk_loss))
        dead.append(int(dead_mask.sum()) if dead_mask is not None else 0)
    return {"step_s": step_s, "train_fvu": fvu, "train_auxk_loss": aux, "dead_by_sparsify": dead,
            "dead_at_end": int((since_fired > a.dead_tokens).sum())}


@torch.no_grad()
def predict_heldout(coder, rows: Rows, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sparsify's inference rule (its encode: ReLU then per-token TopK; then its decode), raw units.
    A latent counts as active where its kept value is > 0 (TopK may keep zeros after the ReLU)."""
    preds, l0 = [], []
    ever = torch.zeros(coder.num_latents, dtype=torch.bool)
    for i in range(0, len(rows.heldout), batch):
        acts, idx, _ = coder.encode(rows.norm_source(rows.heldout[i:i + batch]))
        preds.append((coder.decode(acts, idx) * rows.target_scale + rows.target_mean).numpy())
        on = acts > 0
        l0.append(on.sum(1).numpy())
        ever[idx[on]] = True
    return np.concatenate(preds).astype(np.float32), np.concatenate(l0), ever.numpy()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"eai-sparsify": version("eai-sparsify"), "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def window_ms(step_s: list[float], window: int = 10) -> list[float]:
    """Mean ms per step of each full window of `window` steps (the unit tc's metrics.jsonl logs in)."""
    n = len(step_s) // window
    return [1000 * sum(step_s[w * window:(w + 1) * window]) / window for w in range(n)]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    folder = Path(a.data)
    t_import = time.perf_counter()
    rows = Rows(folder)
    coder, cfg = build_coder(rows.source.shape[1], a)
    with torch.no_grad():   # what the constructor made, before the first-batch bias init
        init = {"W_enc_row_norm_mean": float(coder.encoder.weight.norm(dim=1).mean()),
                "W_enc_abs_max": float(coder.encoder.weight.abs().max()),
                "W_dec_abs_max": float(coder.W_dec.abs().max())}
    t_ready = time.perf_counter()
    result = train(coder, rows, a)
    t_trained = time.perf_counter()
    pred, l0, ever = predict_heldout(coder, rows, a.eval_batch)
    np.save(folder / "pred.npy", pred)
    np.save(folder / "l0.npy", l0)
    np.save(folder / "ever_active.npy", ever)
    late = result["step_s"][10:]   # the first steps pay for allocation and warm-up
    result.update({
        "steps": len(result["step_s"]),
        "step_ms_median_after_10": 1000 * statistics.median(late) if late else None,
        "step_ms_windows_of_10": window_ms(result["step_s"]),
        "loop_s": t_trained - t_ready, "eval_s": time.perf_counter() - t_trained,
        "startup_s": t_ready - START, "import_s": t_import - START,
        "coder_config": cfg.to_dict(), "num_latents": coder.num_latents,
        "train_config": {"optimizer": "torch.optim.Adam (defaults betas 0.9/0.999, eps 1e-8)",
                         "lr": "per step from the driver (tc's schedule)", "batch_size": a.batch_size,
                         "auxk_alpha": a.auxk_alpha, "dead_feature_threshold": a.dead_tokens,
                         "seed": a.seed, "loss": "fvu + auxk_alpha * auxk_loss (sparsify's loss_fn='fvu')"},
        "init_check": init, "decoder_impl": __import__("sparsify.utils").utils.decoder_impl.__name__,
        "torch_threads": torch.get_num_threads(), "versions": versions()})
    Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
