"""Tests of train.py: one-line errors, exact resume, checkpoints that survive a kill, skipped NaN steps.

Runs use the tiny model at 32x32 pixels with a few steps, in-process (8 simulated CPU devices from
conftest.py) or as subprocesses where a signal is needed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train
import weights

TINY = ["--size", "tiny", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--log-every", "1"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.parametrize("argv,message", [
    (["--size", "XL"], "unknown --size 'XL'"),
    (["--image-tower", "B9"], "unknown --image-tower 'B9'"),
    (["--batch-size", "12"], "not divisible by the 8 devices"),
    (["--data", "/nonexistent/{000..003}.tar"], "no such file"),
    (["--vocab", "/nonexistent/vocab.txt"], "does not exist"),
])
def test_errors_are_one_line(argv, message, tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("error: ")


def test_resume_equals_uninterrupted_run(tmp_path):
    """6 steps straight, or 3 steps, a stop, and the same command again: same losses, same parameters."""
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    common = TINY + ["--steps", "6", "--ckpt-every", "3"]
    assert train.main(common + ["--out", straight, "--skip-final-eval"]) == 0
    assert train.main(TINY + ["--steps", "6", "--ckpt-every", "3", "--out", resumed, "--stop-after", "3",
                              "--skip-final-eval"]) == 0
    assert sorted(os.listdir(resumed)) == ["ckpt_000000003", "config.json", "metrics.jsonl"]
    assert train.main(common + ["--out", resumed, "--skip-final-eval"]) == 0
    np.testing.assert_allclose(_losses(resumed), _losses(straight), rtol=1e-6)
    a = weights.read_safetensors(os.path.join(straight, "ckpt_000000006", "model.safetensors"))
    b = weights.read_safetensors(os.path.join(resumed, "ckpt_000000006", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    out = str(tmp_path)
    assert train.main(TINY + ["--steps", "4", "--out", out, "--plant-nan-at", "2", "--skip-final-eval"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["finite"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert rows[-1]["skipped_steps"] == 1
    assert all(np.isfinite(r["loss"]) or r["finite"] == 0.0 for r in rows)


def _run(out, *extra, steps=40):
    cmd = [sys.executable, "train.py"] + TINY + ["--steps", str(steps), "--ckpt-every", "2", "--out", out,
                                                 "--skip-final-eval", *extra]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(train.__file__)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = str(tmp_path)
    p = _run(out, "--ckpt-every", "1000")
    # wait for the first logged step, then preempt
    import time
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(os.path.join(out, "metrics.jsonl"))
                                          and os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0):
        time.sleep(0.5)
    p.terminate()
    output, _ = p.communicate(timeout=240)
    assert p.returncode == 0, output
    ckpts = [d for d in os.listdir(out) if d.startswith("ckpt_")]
    assert len(ckpts) == 1 and "checkpoint written" in output
    step = int(ckpts[0].split("_")[1])
    assert step == json.load(open(os.path.join(out, ckpts[0], "train_state.json")))["step"] < 40
