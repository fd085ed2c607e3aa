"""The M-step under `accelerate launch` inside `autocode train`: presets, a 2-process gloo run, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from autocode4math.cli import app
from autocode4math.config import ConfigError, load_config
from autocode4math.em import TrainConfig, train
from autocode4math.launch import LaunchConfig, launch_command, preset_names, preset_path
from autocode4math.mstep import MStepConfig, run_mstep

FAST = [
    "queries=toy",
    "queries_limit=2",
    "estep.k=2",
    "estep.per_query=2",
    "estep.batch_size=8",
    "estep.rollout.max_new_tokens=10",
    "mstep.max_steps=2",
    "mstep.micro_batch_size=1",
    "mstep.lr=0.01",
    "eval.every=0",
    "iterations=1",
]


def test_the_shipped_presets_and_their_errors(tmp_path):
    assert {"single_gpu", "ddp", "fsdp", "deepspeed_zero2", "cpu_ddp"} <= set(preset_names())
    for name in preset_names():
        preset = yaml.safe_load(preset_path(name).read_text())
        assert preset["num_processes"] >= 1 and preset["distributed_type"]
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: 'NO'\nnum_processes: 1\n")
    assert preset_path(str(own)) == own
    for bad in ("fsdp2", "presets/ddp", str(tmp_path / "missing.yaml")):
        with pytest.raises(ValueError, match="unknown launch preset"):
            LaunchConfig(preset=bad)
    with pytest.raises(ConfigError, match="unknown launch preset"):
        load_config(TrainConfig, None, ["launch.preset=nope"])


def test_launch_command_names_the_preset_the_processes_and_the_mstep(tmp_path):
    argv = launch_command("M", "D.jsonl", tmp_path / "c.yaml", tmp_path / "out", LaunchConfig("fsdp", num_processes=4))
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    assert argv[argv.index("--config_file") + 1] == str(preset_path("fsdp"))
    assert argv[argv.index("--num_processes") + 1] == "4"
    tail = argv[argv.index("autocode4math.cli") - 1 :]
    assert tail == ["-m", "autocode4math.cli", "mstep", "--model", "M", "--data", "D.jsonl",
                    "--out", str(tmp_path / "out"), "--config", str(tmp_path / "c.yaml")]  # fmt: skip
    assert "--num_processes" not in launch_command("M", "D", tmp_path, tmp_path, LaunchConfig("ddp"))


@pytest.mark.slow
def test_two_process_gloo_mstep_from_train_matches_the_in_process_one(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [*FAST, f"model={tiny_model_dir}", f"out={run}", "launch.preset=cpu_ddp"])
    train(cfg, progress=False)
    mstep = run / "iter-01" / "mstep"
    launched = load_file(mstep / "model" / "model.safetensors")

    # the same update in this process: 1 process x 2 accumulated micro-batches = 2 processes x 1 micro-batch
    # (two processes that failed to form a group would each train alone with grad_accum 1: other weights)
    config = load_config(MStepConfig, mstep / "launch_mstep.yaml", ["grad_accum=2"])
    here = run_mstep(str(tiny_model_dir), run / "iter-01" / "collect" / "train.jsonl", config, tmp_path / "here",
                     progress=False)  # fmt: skip
    local = load_file(Path(here) / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert launched.keys() == local.keys()
    moved = max((launched[k] - initial[k]).abs().max().item() for k in launched)
    assert moved > 1e-3  # the update did change the weights, so agreeing below means something
    for name in launched:
        torch.testing.assert_close(launched[name], local[name], rtol=1e-4, atol=1e-5)

    log_lines = (mstep / "launch.log").read_text().count("\n$ ")
    train(cfg, progress=False)  # finished: the rerun launches nothing
    assert (mstep / "launch.log").read_text().count("\n$ ") == log_lines


@pytest.mark.slow
def test_a_failed_launch_stops_the_loop_with_the_end_of_its_log(tiny_model_dir, tmp_path):
    one = tmp_path / "one_cpu.yaml"
    one.write_text("distributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\nmixed_precision: 'no'\n")
    args = ["train", "--method", "sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
            "--iterations", "2", "--launch", str(one), "--set", "eval.every=0", "--set", "sft_per_iteration=3",
            "--set", "mstep.grad_accum=4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "accelerate launch failed" in result.output and "fewer than one optimizer step" in result.output
    assert not (tmp_path / "run" / "iter-02").exists()  # the loop stopped at the failed M-step
    bad = CliRunner().invoke(app, ["train", "--launch", "fsdp3", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown launch preset" in bad.output
