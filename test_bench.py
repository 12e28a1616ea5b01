"""bench.py's counting and wiring (nothing here times anything; BENCHMARKS.md holds the timings)."""

import json

import jax
import jax.numpy as jnp
import pytest

import bench


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
    for name in ("step", "versus-torch", "data", "retrieval", "towers"):
        args = bench.parser().parse_args([name])
        assert callable(args.fn) and args.json is None
