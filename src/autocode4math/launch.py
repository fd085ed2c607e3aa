"""The M-step as a child process under `accelerate launch`, so `autocode train` can train on several GPUs.

`autocode train --launch fsdp` runs each iteration's M-step as
    python -m accelerate.commands.launch --config_file presets/accelerate/fsdp.yaml \
        -m autocode4math.cli mstep --model POLICY --data train.jsonl --out iter-NN/mstep --config launch_mstep.yaml
with the iteration's MStepConfig written to `launch_mstep.yaml`. The child's output is shown and
appended to `iter-NN/mstep/launch.log`; a failure stops the loop with the log's tail in the error.
The loop takes the child's `model/` once `done.json` marks it finished; a rerun after an
interruption launches again and `run_mstep` resumes from its own training-state checkpoint.

The child imports the same source tree as the parent (its `src` directory goes first on
PYTHONPATH) and gets a free rendezvous port, so several runs can share a machine. Presets with
`use_cpu: true` (cpu_ddp, for tests and CPU machines) also get ACCELERATE_USE_CPU=true: accelerate's
torchrun launcher does not pass `use_cpu` on to the processes it starts (accelerate 1.15), and
without it they would not form a gloo process group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autocode4math.config import save_config
from autocode4math.io import write_json
from autocode4math.mstep import MStepConfig
from autocode4math.rollout.server import free_port

PRESETS = Path(__file__).parent / "presets" / "accelerate"
SOURCE = Path(__file__).resolve().parents[1]
"""The directory that holds this package (src/ in a checkout), put first on the child's PYTHONPATH."""


class LaunchError(RuntimeError):
    """The launched M-step failed; the message holds the end of its log."""


def preset_names() -> list[str]:
    """The shipped accelerate presets (single_gpu, ddp, fsdp, deepspeed_zero2, cpu_ddp)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(preset: str) -> Path:
    """A shipped preset by name, or a YAML file by path; ValueError naming the shipped ones otherwise."""
    if (PRESETS / f"{preset}.yaml").exists():
        return PRESETS / f"{preset}.yaml"
    if Path(preset).is_file():
        return Path(preset)
    raise ValueError(f"unknown launch preset {preset!r}: use one of {preset_names()} or a YAML file")


@dataclass
class LaunchConfig:
    """How the M-step runs: in this process, or under `accelerate launch` with a preset."""

    preset: str = ""
    """"" runs the M-step in this process; otherwise a preset name (single_gpu, ddp, fsdp, deepspeed_zero2,
    cpu_ddp) or an accelerate config YAML."""
    num_processes: int = 0
    """Processes to launch (GPUs on one machine); 0 keeps the preset's num_processes."""

    def __post_init__(self) -> None:
        if self.preset:
            preset_path(self.preset)
        if self.num_processes < 0:
            raise ValueError(f"num_processes must be >= 0, got {self.num_processes}")


def launch_command(
    model: str, data: str, config_file: Path, out: Path, launch: LaunchConfig, fingerprint_file: Path | None = None
) -> list[str]:
    """argv of the launched M-step."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_path(launch.preset))]
    argv += ["--main_process_port", str(free_port())]
    if launch.num_processes:
        argv += ["--num_processes", str(launch.num_processes)]
    argv += ["-m", "autocode4math.cli", "mstep", "--model", model, "--data", data, "--out", str(out)]
    argv += ["--config", str(config_file)]
    return argv + (["--fingerprint", str(fingerprint_file)] if fingerprint_file else [])


def launch_mstep(
    model: str,
    data: str,
    config: MStepConfig,
    out: Path,
    launch: LaunchConfig,
    progress: bool = True,
    fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Run `run_mstep` under accelerate launch; return out/model, or raise LaunchError with the log's tail.

    `fingerprint` (the stage's, from `autocode train`) is handed to the child, which checks it instead
    of hashing the model and data itself.
    """
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "launch_mstep.yaml"
    save_config(config, config_file)
    fingerprint_file = out / "launch_fingerprint.json" if fingerprint else None
    if fingerprint_file:
        write_json(fingerprint_file, fingerprint)
    argv = launch_command(model, data, config_file, out, launch, fingerprint_file)
    log_path = out / "launch.log"
    with log_path.open("a", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(launch), text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if progress:
                print(line, end="", flush=True)
        code = proc.wait()
    if code != 0 or not (out / "done.json").exists():
        why = f"failed (exit code {code})" if code else "ended without a finished model"
        raise LaunchError(f"the M-step under accelerate launch {why}; {log_path}:\n{tail(log_path)}")
    return out / "model"


def _child_env(launch: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE), *filter(None, [env.get("PYTHONPATH")])])
    preset = yaml.safe_load(preset_path(launch.preset).read_text(encoding="utf-8")) or {}
    if preset.get("use_cpu"):
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file."""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])
