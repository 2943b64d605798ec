"""What tc tells its user: where the result is and what to run next, when a setting is unusual, when a
number means nothing, and checkpoints by time so an interrupt loses little."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.demo import whole
from pipeline.evaluate import recovered_note
from pipeline.train import TrainConfig, run_train
from test_train import run_subprocess, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_ends_naming_the_transcoder_and_the_next_commands(synthetic_store, tmp_path, capsys):
    run = run_train(tiny(synthetic_store, tmp_path / "run", steps=8))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"done: the transcoder is {run / 'transcoder.safetensors'}")
    assert f"tc samples collect --run {run}" in last and f"tc eval --run {run}" in last


def test_a_dictionary_far_wider_than_the_store_gets_a_note(synthetic_store, tmp_path, capsys):
    run_train(tiny(synthetic_store, tmp_path / "narrow", steps=4))            # 128 latents, d_model 32: 4x
    assert "note: --dict-size" not in capsys.readouterr().out
    run_train(tiny(synthetic_store, tmp_path / "wide", steps=4, dict_size=4096, groups=[4096]))
    assert "note: --dict-size 4,096 is 128x the store's d_model 32" in capsys.readouterr().out


@pytest.mark.parametrize("ce_clean,ce_zero,noted", [(3.0, 5.0, False), (3.0, 2.9, True), (3.0, 3.0, False)])
def test_a_fraction_recovered_that_means_nothing_is_marked(ce_clean, ce_zero, noted):
    from pipeline.lm_eval import fraction_recovered

    lm = {"ce_clean": ce_clean, "ce_zero": ce_zero, "fraction_recovered": fraction_recovered(ce_clean, 3.5, ce_zero)}
    assert bool(recovered_note(lm)) == noted


def test_the_demo_names_the_token_counts_the_stages_use():
    assert whole(100_000, 256) == 100_096 and whole(4_000, 256) == 4_096 and whole(512, 256) == 512


def test_checkpoints_by_time_resume_exactly(synthetic_store, tmp_path):
    """--checkpoint-minutes tiny: a checkpoint after every step; a kill at step 13 loses nothing."""
    whole_run = run_train(tiny(synthetic_store, tmp_path / "whole"))
    cfg = tiny(synthetic_store, tmp_path / "run", checkpoint_minutes=1e-9)
    killed = run_subprocess(cfg, kill_at=13)
    assert killed.returncode == -9
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000013"
    assert run_subprocess(TrainConfig(resume=str(tmp_path / "run"))).returncode == 0
    a, b = load_file(whole_run / "transcoder.safetensors"), load_file(tmp_path / "run" / "transcoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]
