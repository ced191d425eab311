"""`rlchat train ppo` with 2 CPU processes (DDP over gloo), launched by torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Settings
from agent.store.api import Store

REPO = Path(__file__).resolve().parents[2]


def likes_e(context: list[dict[str, str]], reply: str) -> float:
    """The oracle reward (named as `test_distributed:likes_e` by the launched processes)."""
    return reply.count("e") / max(1, len(reply))


@pytest.mark.slow
def test_two_processes_hold_identical_weights_after_updates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"hello number {i}"}) for i in range(16)))
    data_dir = tmp_path / "data"
    settings = {
        "policy": tiny_model_dir,
        "reward": "test_distributed:likes_e",
        "prompts": prompts,
        "iterations": 2,
        "batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 8,
        "learning_rate": 0.01,
        "eval_prompts": 0,
        "device": "cpu",
    }
    # `accelerate launch --cpu` starts one process without MPI; torchrun (which `accelerate
    # launch --multi_gpu` runs on GPUs) starts both, and Accelerate picks gloo on the CPU.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        "-m", "rlchat.cli",
        "--data-dir", str(data_dir), "train", "ppo",
        *[item for k, v in settings.items() for item in ("--set", f"{k}={v}")],
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "process 1 of 2" in output, output[-4000:]
    digests = dict(re.findall(r"rank (\d+): trainable weights sha256 ([0-9a-f]{64})", output))
    assert sorted(digests) == ["0", "1"], output[-4000:]
    assert digests["0"] == digests["1"]
    store = Store.open(Settings(data_dir=data_dir))
    (run,) = store.list_runs("ppo")
    assert run.status == "succeeded" and run.metrics["step"] == 2
    assert store.get_model_version(run.output_version_id).kind == "ppo"
    store.close()
