"""`scripts/benchmark.py gpu --tiny`: the GPU benchmark's code, run on CPU with tiny shapes, writes its JSON and table;
with no budget left every stage is skipped and says why."""

import json
import runpy
import sys

from conftest import ROOT, run_cli


def test_tiny_run_writes_json_and_table(tmp_path):
    r = run_cli(ROOT / "scripts" / "benchmark.py", "gpu", "--tiny", "--out", tmp_path, timeout=900)
    assert r.stdout.startswith("jax.devices(): [Cpu")  # what JAX sees comes first
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["platform"] == "cpu" and data["dtype"] == "bfloat16" and data["bandwidth_gbs"] > 0
    assert "jax" in data["versions"]
    (row,) = data["rows"]
    assert row["model"] == "tiny" and row["skipped"] == {} and row["fused_attention"] == "xla"
    for key in (
        "decode1_ms_per_step",
        "decode1_roofline_ms",
        "decode16_tokens_per_s",
        "prefill_xla_tokens_per_s",
        "prefill_plain_tokens_per_s",
        "program_peak_gib",
        "torch_decode1_ms_per_step",
        "torch_prefill_tokens_per_s",
    ):
        assert row[key] > 0, key
    assert 0 < row["decode1_roofline_pct"] < 1000
    for b in (1, 16):  # the derived figures follow from the measured ones
        step = row[f"decode{b}_ms_per_step"]
        assert abs(row[f"decode{b}_tokens_per_s"] - b * 1e3 / step) < 1e-6 * row[f"decode{b}_tokens_per_s"]
        assert abs(row[f"decode{b}_roofline_pct"] - 100 * row[f"decode{b}_roofline_ms"] / step) < 1e-6 * 100
    # the roofline is bytes / measured bandwidth: 16 rows read the same weights plus 16x the KV cache
    assert row["decode16_roofline_ms"] > row["decode1_roofline_ms"]
    from neox_jax.model.config import preset

    cfg = preset("tiny")
    weights = (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * 2  # bfloat16, the embedding not read per step
    assert row["decode1_roofline_ms"] >= weights / (data["bandwidth_gbs"] * 1e9) * 1e3
    table = (tmp_path / "gpu.md").read_text()
    assert "| tiny | prefill_fused (xla)_tokens_per_s |" in table and "% reached" in table


def test_no_budget_skips_every_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--tiny", "--budget-s", "0", "--no-torch", "--out", str(tmp_path)])
    runpy.run_module("neox_jax.bench.gpu", run_name="__main__")
    (row,) = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert set(row["skipped"]) == {"init"} and "s of the budget left" in row["skipped"]["init"]
    assert "decode1_ms_per_step" not in row
    assert "init: skipped" in capsys.readouterr().out
