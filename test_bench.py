"""bench.py's counting and wiring (nothing here times anything; BENCHMARKS.md holds the timings)."""

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import bench
import bench_gpu


def _scanned(w_RDD, x_BD):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_BD, w_RDD)[0].sum()


def _unrolled(w_RDD, x_BD):
    for w in w_RDD:
        x_BD = jnp.tanh(x_BD @ w)
    return x_BD.sum()


def test_model_flops_counts_every_scan_iteration():
    w, x = jnp.ones((6, 32, 32)), jnp.ones((4, 32))
    matmuls = 6 * 2 * 4 * 32 * 32  # forward only
    for fn in (_scanned, _unrolled):
        assert bench.model_flops(fn, w, x) == pytest.approx(bench.model_flops(_unrolled, w, x))
        assert bench.model_flops(jax.grad(fn), w, x) >= 3 * matmuls  # backward: two matmuls per forward one
    # Why bench.py unrolls: XLA's own count of the compiled scan sees its body once.
    assert jax.jit(_scanned).lower(w, x).compile().cost_analysis()["flops"] < matmuls / 2


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("TPU v3", 61.5), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
                                          ("TPU v5", 459.0), ("cpu", None)])
def test_peak_tflops_by_device_kind(kind, tflops):
    assert bench.peak_tflops(kind) == tflops
    assert bench.peak_tflops(kind, override=100.0) == 100.0


def test_configs_resolve_like_train_py():
    args = bench.parser().parse_args(["step", "--size", "B1", "--image-tower", "B0", "--depthwise", "conv"])
    cfg, recipe = bench.configs(args)
    assert (cfg.image.name, cfg.text.name, cfg.embed_dim, recipe.image_size) == ("B0", "Mini", 640, 289)
    assert (cfg.image.depthwise, cfg.text.vocab_size) == ("conv", 100_000)
    assert cfg.image.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    tiny, _ = bench.configs(bench.parser().parse_args(["versus-torch", "--size", "tiny"]))
    assert tiny.text.vocab_size < 1000  # the synthetic data's vocabulary, as train.py uses


def test_retrieval_writes_json_and_stays_within_its_tiles(tmp_path):
    out = tmp_path / "r.json"
    bench.main(["retrieval", "--n", "50", "200", "--dim", "16", "--block", "64", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["captions"] for r in rows] == [250, 1000]
    for r in rows:
        assert 0 <= r["i2t_R@1"] <= 100 and r["seconds"] > 0
        assert r["peak_mib"] < 1  # a handful of 64 x 64 tiles, not the 200 x 1000 matrix


def test_data_pipeline_runs_on_one_shard(capsys):
    """`bench.py data` end to end in this process: one shard of 64 JPEGs, one timed batch of 64 at 64x64."""
    bench.main(["data", "--workers", "0", "--shards", "1", "--images", "64", "--batches", "1", "--image-size", "64"])
    assert "images/s per core" in capsys.readouterr().out


def test_every_subcommand_parses_with_its_defaults():
    for name in ("step", "versus-torch", "data", "retrieval", "towers", "gpu"):
        args = bench.parser().parse_args([name])
        assert callable(args.fn) and args.json is None


@pytest.mark.parametrize("tried, predicted, cap, expected", [
    ({}, None, 512, 8),                                   # no memory model: start, then double
    ({8: True}, None, 512, 16),
    ({8: True, 16: True, 32: False}, None, 512, 24),      # then bisect
    ({2: True}, None, 2, None),                           # the cap fits: done
    ({1: False}, None, 512, None),                        # nothing fits
    ({}, 150, 512, 144),                                  # the model's batch, a multiple of 8 from 16 up
    ({}, 1000, 512, 512),                                 # capped
    ({144: True}, 150, 512, None),                        # the model sees under 12.5% more room
    ({144: True}, 300, 512, 296),
    ({144: False}, 100, 512, 96),
    ({144: False}, 200, 512, 72),                         # the model is wrong: bisect instead
    ({128: True, 136: False}, 140, 512, None),            # within 12.5%
    ({5: True, 7: False}, 9, 512, 6),
])
def test_next_batch_predicts_then_bisects(tried, predicted, cap, expected):
    assert bench_gpu.next_batch(tried, predicted, cap, start=8) == expected


def test_a_section_past_its_budget_is_killed_and_keeps_what_it_wrote(tmp_path):
    partial = str(tmp_path / "section.json")
    code = f"import json, time; json.dump({{'rows': [1]}}, open({partial!r}, 'w')); time.sleep(60)"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    rec = bench_gpu.finish_child(proc, partial, timeout_s=3, budget_s=3, t0=t0)
    assert time.perf_counter() - t0 < 20 and proc.returncode is not None
    assert rec["status"] == "timeout" and rec["rows"] == [1] and "budget" in rec["error"]


def test_gpu_check_at_tiny_size_has_every_section_and_passes_cpu_against_cpu(tmp_path):
    """`python bench.py gpu --tiny`, what a CPU-only machine runs anyway: every section has results or a recorded
    skip, the correctness checks (here the CPU against itself, and bfloat16 against float32) pass, and the
    depthwise convolution's forms agree."""
    out = tmp_path / "gpu.json"
    bench.main(["gpu", "--tiny", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tiny"] and set(r["sections"]) == {*bench_gpu.SECTIONS, "flops"}
    for name, s in r["sections"].items():
        assert s["status"] in ("ok", "skipped"), (name, s.get("error"))
        assert s["status"] == "ok" or s["skipped"]
    checks = r["sections"]["correctness"]["checks"]
    assert len(checks) == 5 and all(c["pass"] and c["rel_diff"] <= c["tolerance"] for c in checks)
    rows = r["sections"]["step"]["rows"]
    assert [(row["remat"], row["fits"]) for row in rows] == [(False, True), (True, True)]
    assert all(row["images_per_s"] > 0 and row["gflops_per_device"] > 0 for row in rows)
    depthwise = r["sections"]["depthwise"]
    assert {t["impl"] for t in depthwise["totals"]} == set(bench_gpu.IMPLS)
    # The same function to bfloat16's precision (autodiff's backward sums in bfloat16: 3e-2 at B7's shapes).
    assert all(d < 5e-2 for s in depthwise["shapes"] for d in s["rel_diff_vs_conv"].values())
    torch_section = r["sections"]["torch"]
    assert torch_section["status"] == "skipped" or torch_section["rows"][0]["images_per_s"] > 0
