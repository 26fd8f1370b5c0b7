"""bench.py on the CPU at the opt-tiny shape: timing compress's stages leaves its results alone, its JSON has
every stage, and the factor micro-benchmark runs. A couple of seconds. Run: python -m pytest -q tests/test_bench.py
"""
from __future__ import annotations

import json

import torch

import bench
import opt_enhanced
from modelutils import walk_layers
from pipeline.compress import compress
from systems.progress import Log

CPU = torch.device("cpu")
FLAGS = ["--device", "cpu", "--nsamples", "2", "--seqlen", "16", "--sparsity", "0.5", "--wbits", "4"]


def test_timing_the_stages_leaves_the_compression_alone():
    cfg = opt_enhanced.parse_args(["synthetic", "c4", "--quiet", *FLAGS, "--target_avg_bits", "4", "--clip", "none"])
    shipped, _ = bench.build_synthetic("opt-tiny", 2, CPU, False)
    staged, _ = bench.build_synthetic("opt-tiny", 2, CPU, False)
    assert all(torch.equal(a, b) for a, b in zip(shipped.parameters(), staged.parameters()))
    calibration = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    compress(shipped, calibration, cfg, CPU, Log(True))
    clock = bench.LayerClock(CPU)
    compress(staged, calibration, cfg, CPU, clock)
    for (name, a), b in zip(shipped.named_parameters(), staged.parameters()):
        assert torch.equal(a, b), name
    report = clock.report()
    assert len(report["per_layer_stage_s"]) == 2 and set(report["before_layers_s"]) >= {"sensitivity", "plan: costs"}
    for layer in report["per_layer_stage_s"]:  # every Linear's costs, allocation, factor and solve were timed
        assert {"hessians", "costs", "allocate", "factor", "solve"} <= set(layer) and all(v >= 0 for v in layer.values())


def test_synthetic_stages_json(tmp_path):
    out = tmp_path / "stages.json"
    assert bench.main(["--synthetic", "opt-tiny", "--layers", "1", "--stages", "--json", str(out), "--", *FLAGS]) == 0
    res = json.loads(out.read_text())
    assert res["layers"] == 1 and res["of"] == 2 and res["device"] == "cpu" and res["host_peak_gib"] > 0
    assert set(res["stage_s"]) == {"hessians", "factor", "solve"} and res["before_layers_s"] == {}
    assert res["compress_s"] >= sum(res["stage_s"].values())
    assert "| 0 |" in bench.stage_table(res)


def test_factor_bench_on_the_cpu(capsys):
    rows = bench.factor_bench([96, bench.CPU_FACTOR_MAX + 1], CPU, repeats=1)
    assert [r["n"] for r in rows] == [96]
    assert rows[0]["one_cholesky_relative_difference"] < 1e-5
    assert rows[0]["one_cholesky_identity_solve_relative_difference"] < 1e-5
    assert "skipping n=2049" in capsys.readouterr().err


def test_synthetic_reports_each_layers_wall_time(tmp_path, capsys):
    out = tmp_path / "walls.json"
    assert bench.main(["--synthetic", "opt-tiny", "--layers", "3", "--offload", "--no-overlap", "--json", str(out),
                       "--", *FLAGS]) == 0
    res = json.loads(out.read_text())
    walls = res["per_layer_wall_s"]
    assert len(walls) == 3 and all(w > 0 for w in walls) and res["steady_layer_s"] == walls[1]
    assert sum(walls) <= res["compress_s"] and res["overlap"] is False  # on the CPU nothing moves
    assert "per-layer wall s (overlap off): 0: " in capsys.readouterr().out
    clock = bench.LayerClock()
    assert list(clock.bar(iter("ab"), 2, "")) == ["a", "b"] and clock.report()["steady_layer_s"] is None


def test_synthetic_stream_makes_each_layer_when_reached_and_drops_it(tmp_path):
    model, _ = bench.build_synthetic("opt-tiny", 3, CPU, True, stream=True)
    layers = model.model.decoder.layers
    assert len(layers) == 3 and all(p.device.type == "meta" for p in layers.parameters())
    template = model.layer_store.template
    for i, layer in walk_layers(model, CPU):
        assert all(torch.equal(t, template[n]) for n, t in layer.state_dict().items())
    assert all(p.device.type == "meta" for p in layers.parameters())
    out = tmp_path / "stream.json"
    assert bench.main(["--synthetic", "opt-tiny", "--layers", "3", "--stream", "--json", str(out), "--", *FLAGS]) == 0
    res = json.loads(out.read_text())
    assert res["stream"] and res["offload"] and len(res["per_layer_wall_s"]) == 3 and res["params"] > 3 * 2 ** 20
