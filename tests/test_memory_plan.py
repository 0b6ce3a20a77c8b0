"""memory-plan --train: XLA's compiled memory analysis of the real train step matches the step's measured peak on
CPU (within 20%), and the command prints its table."""

import json

import pytest

from conftest import run_cli


def test_planned_bytes_match_measured_peak():
    """Full training with --remat full on a 4-layer model (hidden 256), float32, one device: the plan (arguments +
    outputs - donated + temp) vs the rise of the process's resident high-water mark while the step runs
    (tests/memory_worker.py explains the measurement)."""
    r = run_cli("tests/memory_worker.py", "all", "full", 4, 128, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    plan, measured = got["plan"], got["measured"]
    assert plan["temp"] > 0.25 * plan["peak"]  # the activations matter to the sum, not just the weights
    assert abs(plan["peak"] - measured) <= 0.2 * measured, got


def test_memory_plan_train_command():
    r = run_cli(
        "-m",
        "neox_jax",
        "memory-plan",
        "--preset",
        "tiny",
        "--train",
        "lora",
        "--mesh",
        "fsdp=2,model=2",
        "--length",
        32,
        "--batch",
        2,
    )
    rows = [line for line in r.stdout.splitlines() if line.startswith("| fsdp=2,model=2 |")]
    assert len(rows) == 1 and rows[0].endswith("| **yes** |"), r.stdout


def test_memory_plan_inference_command():
    """Without --train: generate's compiled prefill and decode chunk per dtype, one row per GPU count and dtype."""
    r = run_cli("-m", "neox_jax", "memory-plan", "--preset", "tiny", "--gpus", "1,2", "--length", 64)
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 6, r.stdout
    assert all("| **yes** |" in row for row in rows), r.stdout
    assert [row.split(" | ")[1] for row in rows[:3]] == ["fp16", "bf16", "int8"]


@pytest.mark.parametrize("program", ["prefill"])
def test_inference_plan_matches_measured_peak(program):
    """generate's prefill (a 256-token prompt) and decode chunk (over a 2 x 256 cache, donated) on a 4-layer model,
    float32, one device: the plan vs the measured rise of the resident high-water mark (tests/memory_worker.py)."""
    r = run_cli("tests/memory_worker.py", program, 2, 256, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    plan, measured = got["plan"], got["measured"]
    assert abs(plan["peak"] - measured) <= 0.2 * measured, got
