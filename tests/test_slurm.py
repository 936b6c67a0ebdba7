"""The SLURM scripts: the launch command each node runs, and the preemption path (signal -> checkpoint -> requeue).

SLURM itself is not installed here: the command-building part runs with fake SLURM variables, and the
preemption test puts two small stand-ins on PATH (`srun` runs its task locally and forwards signals as
srun does; `scontrol` records the requeue). The launcher in between is the real `accelerate launch`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "scripts" / "slurm_launch.sh"


def _run(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env)
    return subprocess.run(
        ["bash", str(LAUNCH), *args],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


TWO_NODES = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "GPUS_PER_NODE": "8"}
NODE_CMD = (
    "accelerate launch --config_file launch_configs/fsdp.yaml --num_processes 16 --num_machines 2 "
    "--machine_rank {rank} --main_process_ip gpu07 --main_process_port 29500 --rdzv_backend static --same_network "
    "-m slackdist train --resume auto --data data/prepared --output out/run\\ 1"
)


def test_two_node_job_prints_the_command_of_each_node() -> None:
    proc = _run(["--print", "--", "--data", "data/prepared", "--output", "out/run 1"], TWO_NODES)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["srun"] == (
        f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash {LAUNCH} --node -- "
        "--data data/prepared --output out/run\\ 1"
    )
    # srun's task line keeps $SLURM_NODEID unexpanded, so that each node fills in its own
    assert lines["per-node"] == NODE_CMD.format(rank="$SLURM_NODEID")
    assert lines["node 0"] == NODE_CMD.format(rank="0")
    assert lines["node 1"] == NODE_CMD.format(rank="1")


def test_each_node_expands_its_own_rank() -> None:
    for rank in ("0", "1"):
        proc = _run(
            ["--node", "--", "--data", "data/prepared", "--output", "out/run 1"],
            {**TWO_NODES, "SLURM_NODEID": rank, "DRY_RUN": "1"},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == NODE_CMD.format(rank=rank)


@pytest.mark.parametrize(
    ("nodelist", "head"),
    [("gpu[07-08]", "gpu07"), ("a1,a2", "a1"), ("node[3,5-6],x", "node3"), ("dgx-[009-010]", "dgx-009")],
)
def test_head_node_from_nodelist_without_scontrol(nodelist: str, head: str) -> None:
    proc = _run(
        ["--print"],
        {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": nodelist, "GPUS_PER_NODE": "4", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"--main_process_ip {head} " in proc.stdout


def test_head_node_from_scontrol_when_present(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "n-a\\nn-b\\n"\n')
    (fake / "scontrol").chmod(0o755)
    proc = _run(
        ["--print"],
        {
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "whatever[1-2]",
            "GPUS_PER_NODE": "4",
            "PATH": f"{fake}:/usr/bin:/bin",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "--main_process_ip n-a " in proc.stdout and "--num_processes 8 " in proc.stdout


def test_single_node_has_no_rendezvous_arguments() -> None:
    proc = _run(
        ["--print", "--", "--data", "d"],
        {"SLURM_NNODES": "1", "GPUS_PER_NODE": "4", "LAUNCH_CONFIG": "launch_configs/ddp.yaml"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "node 0: accelerate launch --config_file launch_configs/ddp.yaml --num_processes 4 -m slackdist train "
        "--resume auto --data d" in proc.stdout
    )
    assert "--machine_rank" not in proc.stdout


@pytest.mark.parametrize("script", ["slurm_single_node.sbatch", "slurm_multi_node.sbatch"])
def test_sbatch_headers(script: str) -> None:
    text = (REPO / "scripts" / script).read_text(encoding="utf-8")
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@120" in text
    assert "#SBATCH --ntasks-per-node=1" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "scripts/slurm_launch.sh" in text
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


PROBE = """
import os, signal, sys, pathlib
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
pathlib.Path(os.environ["PROBE_DIR"], "ready").write_text(" ".join(sys.argv[1:]))
while not got:
    signal.pause()
pathlib.Path(os.environ["PROBE_DIR"], "got_usr1").write_text("yes")
sys.exit(75)
"""

SRUN = """#!/bin/bash
# stand-in for srun on one node: run the task here, forward USR1/TERM to it as srun does
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@" &
pid=$!
trap 'kill -USR1 $pid' USR1 TERM
while true; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done
exit $rc
"""


@pytest.mark.slow
def test_preemption_signal_reaches_training_process_and_job_is_requeued(tmp_path: Path) -> None:
    """sbatch script gets SIGUSR1 -> srun -> node task -> the process under `accelerate launch` -> exit 75 -> requeue."""
    bin_dir, probe_dir = tmp_path / "bin", tmp_path / "probe"
    bin_dir.mkdir()
    probe_dir.mkdir()
    (probe_dir / "preempt_probe.py").write_text(PROBE)
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
        PYTHONPATH=f"{probe_dir}:{REPO}",
        PROBE_DIR=str(probe_dir),
        PYTHON_MODULE="preempt_probe",
        LAUNCH_CONFIG="launch_configs/cpu.yaml",
        GPUS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    job = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "slurm_single_node.sbatch"), "--data", "d"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not (probe_dir / "ready").exists():
        assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, "the training process did not start"
        time.sleep(0.1)
    assert (probe_dir / "ready").read_text() == "train --resume auto --data d"
    job.send_signal(signal.SIGUSR1)  # what SLURM does 120 s before the time limit (--signal=B:USR1@120)
    output, _ = job.communicate(timeout=60)
    assert (probe_dir / "got_usr1").read_text() == "yes", output
    assert job.returncode == 0, output
    assert "requeueing job 4242" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
