"""Tests of train.py: one-line errors, exact resume after a kill mid-checkpoint, SIGTERM, skipped NaN
steps, two processes training as one through a SIGTERM to one of them, the memory report, checkpoint
files mapped rather than read.

Runs use the tiny model at 32x32 pixels with a few steps, in-process (8 simulated CPU devices from
conftest.py) or as subprocesses where a signal, a kill or several processes are needed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import align
import memory
import synthetic
import train
import weights

# Compiling the step is most of a test's time. A warm-up longer than any test's run keeps the
# learning-rate schedule's constants, and so the compiled step, the same for every --steps below: it
# compiles once per session (JAX's compilation cache, conftest.py, and train.compile_step's own), in-process
# and in the 8-device subprocesses alike. The hidden --image-stages 4 keeps tiny's first 4 stages (5 of
# its 10 blocks, one of them scanned): 9 s to trace and compile instead of 21 s on this 2-core machine.
TINY = ["--size", "tiny", "--image-stages", "4", "--image-size", "32", "--batch-size", "16", "--workers", "0",
        "--log-every", "1", "--warmup-steps", "100"]
HERE = os.path.dirname(os.path.abspath(train.__file__))


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



def test_checkpoint_or_init_that_does_not_match_is_one_line(tmp_path, capsys):
    """Issue item 8's two model mismatches: a run directory holding another size's checkpoint, and an
    --init model whose vocabulary is not --vocab's. Both are caught before any step runs."""
    import dataclasses
    import jax
    tiny = align.SIZES["tiny"]
    other = dataclasses.replace(tiny, embed_dim=32, text=dataclasses.replace(tiny.text, vocab_size=50))
    params, state = align.init(jax.random.key(0), other)
    run, model = tmp_path / "run" / "ckpt_000000002", str(tmp_path / "model")
    align.save(str(run), params, state, other)
    (run / "train_state.json").write_text('{"step": 2}')
    align.save(model, params, state, other)
    plain = TINY[:TINY.index("--image-stages")] + TINY[TINY.index("--image-stages") + 2:]  # no model flags
    for argv, message in ((["--out", str(tmp_path / "run")], "not the one asked for"),
                          (["--out", str(tmp_path / "new"), "--init", model], "50-word vocabulary")):
        assert train.main(plain + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("error: "), err

def _spawn(argv, log, devices=8):
    """train.py in a subprocess, for what needs one: a signal, a kill, several processes."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]  # conftest's others
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(path, p, log, timeout=300):
    """Until `path` exists and is not empty; fails with the process's output if it ends first."""
    deadline = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            raise AssertionError(f"{path} never appeared; train.py said:\n{open(log).read()[-3000:]}")
        time.sleep(0.2)


def _params(ckpt):
    return weights.read_safetensors(os.path.join(ckpt, "model.safetensors"))


def test_killed_while_checkpointing_then_resumed_equals_uninterrupted_run(tmp_path):
    """4 steps straight; or SIGKILL half-way through writing step 4's checkpoint, and the same command
    again: it ignores the half-written one, resumes from step 2's and gives the same losses and parameters."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    argv = TINY + ["--steps", "4", "--ckpt-every", "2", "--skip-final-eval"]
    log = str(tmp_path / "killed.log")
    assert train.main(argv + ["--out", straight]) == 0  # first: the subprocess then finds its step compiled
    # The hidden --pause-in-checkpoint hangs after the weights and optimizer state are in the temporary
    # directory, before train_state.json and the rename: the kill lands at the same point every time.
    p = _spawn(argv + ["--out", killed, "--pause-in-checkpoint", "4"], log)
    try:
        _wait_for(os.path.join(killed, ".tmp_ckpt_000000004", "optimizer.safetensors"), p, log)
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        p.kill()
    assert sorted(os.listdir(killed)) == [".tmp_ckpt_000000004", "ckpt_000000002", "config.json", "metrics.jsonl"]
    assert align.checkpoints(killed)[-1] == os.path.join(killed, "ckpt_000000002")
    assert align.load(killed)[2].name == "tiny"  # the run directory resolves to step 2's whole checkpoint
    os.makedirs(os.path.join(killed, ".tmp_ckpt_000000003"))  # as a killed run with another --ckpt-every leaves

    assert train.main(argv + ["--out", killed]) == 0  # stale temporary directories are removed on the next save
    assert sorted(os.listdir(killed)) == ["ckpt_000000002", "ckpt_000000004", "config.json", "metrics.jsonl"]
    assert [json.loads(line)["step"] for line in open(os.path.join(killed, "metrics.jsonl"))] == [1, 2, 3, 4]
    np.testing.assert_allclose(_losses(killed), _losses(straight), rtol=1e-6)
    a, b = _params(os.path.join(killed, "ckpt_000000004")), _params(os.path.join(straight, "ckpt_000000004"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_nonfinite_step_is_skipped_and_counted(tmp_path, capsys):
    """A step whose loss and gradients are NaN (--plant-nan-at 2: NaN weights for that step) changes
    nothing: the weights, BatchNorm state and optimizer state after it equal those before it, bit for
    bit; it is counted in its log row and in train_state.json, and the run goes on. train.py reads a
    step's finiteness a step late (the host does not wait for each step): the count still lands on the
    right step and checkpoint, and --max-skipped-steps 1 stops the run with one line naming the step."""
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--steps", "4", "--ckpt-every", "1", "--keep", "4", "--out", out, "--plant-nan-at",
                              "2", "--skip-final-eval"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["finite"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in rows if r["finite"])
    before, after = (os.path.join(out, f"ckpt_00000000{k}") for k in (2, 3))
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (weights.read_safetensors(os.path.join(c, name)) for c in (before, after))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
    assert [json.load(open(os.path.join(c, "train_state.json")))["skipped_steps"] for c in (before, after)] == [0, 1]
    assert json.load(open(os.path.join(out, "ckpt_000000004", "train_state.json")))["skipped_steps"] == 1

    capsys.readouterr()
    assert train.main(TINY + ["--steps", "4", "--out", str(tmp_path / "stops"), "--plant-nan-at", "1",
                              "--max-skipped-steps", "1", "--skip-final-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's last state
    assert err.startswith("error: 1 consecutive steps had a non-finite loss or gradient (step 1)"), err


def test_table8_flags_reach_the_step_and_real_data_skips_the_synthetic_evaluation(tmp_path, capsys):
    """--fixed-temperature and --negatives-fraction (Table 8 rows 5-9) reach the loss: at a temperature of
    100 every logit is within 0.01 of 0, so the loss is 2 ln K, K the candidates per row (8 of the 16
    pairs at fraction 0.5, not 16). Data that is not synthetic and no --eval-data: no held-out scoring."""
    pairs = os.path.join(synthetic.write_synthetic(str(tmp_path / "pairs"), 16, size=39), "pairs.tsv")
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--data", pairs, "--steps", "1", "--out", out, "--fixed-temperature", "100",
                              "--negatives-fraction", "0.5"]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["temperature"] == 100.0
    assert abs(row["loss"] - 2 * np.log(8)) < 0.02, row["loss"]  # 2 ln 16 = 5.55 with every negative
    assert "no held-out evaluation: --data" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "retrieval.json"))
    params, _, cfg = align.load(out)
    assert not cfg.learn_temperature and cfg.temperature_init == 100.0 and "temperature" not in params
    assert cfg.image_size == 32  # recorded for evaluate.py
    assert train.main(TINY + ["--out", out, "--negatives-fraction", "0.3"]) == 2
    assert "must split the batch of 16" in capsys.readouterr().err


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    p = _spawn(TINY + ["--steps", "40", "--ckpt-every", "1000", "--out", out, "--skip-final-eval"], log)
    try:
        _wait_for(os.path.join(out, "metrics.jsonl"), p, log)  # the first step is logged: preempt
        p.terminate()
        assert p.wait(timeout=240) == 0, open(log).read()[-3000:]
    finally:
        p.kill()
    ckpts = [d for d in os.listdir(out) if d.startswith("ckpt_")]
    assert len(ckpts) == 1 and "checkpoint written" in open(log).read()
    step = int(ckpts[0].split("_")[1])
    assert step == json.load(open(os.path.join(out, ckpts[0], "train_state.json")))["step"] < 40


def test_two_processes_train_as_one_and_survive_preemption(tmp_path):
    """Two processes of 4 simulated devices each, coordinated on 127.0.0.1, give one 8-device process's
    losses and checkpoint: the global batch and the all-gathered negatives do not depend on the split.
    On the way, a SIGTERM to one of them (process 1, which does not write) as a preemption sends it:
    both checkpoint after the same step and exit 0, and the same two commands resume and finish with the
    uninterrupted run's losses.

    (The issue asks for 2 x 2 devices against 1 x 4; 2 x 4 against the 8 devices of this process tests
    the same and saves a subprocess and its compile: the reference is the step compiled above. The
    uninterrupted run is that reference: an uninterrupted two-process run would cost two more processes,
    and without preemption the two runs are held to the same tolerances below.)
    """
    import threading
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # The signal goes out once process 0 has logged step 1, and lands after step 1 or 2: the processes wait
    # for each other every step, and a step (over a second here) is far longer than the watcher's poll.
    steps = 3
    argv = TINY + ["--steps", str(steps), "--ckpt-every", "1000", "--skip-final-eval"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    commands = [argv + ["--out", two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i)] for i in range(2)]
    logs = [str(tmp_path / f"process{i}.log") for i in range(2)]
    resumed_logs = [str(tmp_path / f"resumed{i}.log") for i in range(2)]
    procs, seen = [_spawn(commands[i], logs[i], devices=4) for i in range(2)], {}

    def preempt_then_resume():
        """While this process computes the reference: SIGTERM to process 1 once process 0 has logged a
        step; once both have exited, the same two commands again (in a thread, so the two overlap)."""
        metrics, deadline = os.path.join(two, "metrics.jsonl"), time.time() + 600
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            if procs[0].poll() is not None or time.time() > deadline:
                break  # the exit codes, asserted below, say why
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
        seen["exits"] = [p.wait() for p in procs]
        seen["ckpts"] = sorted(d for d in os.listdir(two) if d.startswith("ckpt_"))
        if seen["exits"] == [0, 0] and len(seen["ckpts"]) == 1:
            procs[:] = [_spawn(commands[i], resumed_logs[i], devices=4) for i in range(2)]
            seen["resumed_exits"] = [p.wait() for p in procs]
    watcher = threading.Thread(target=preempt_then_resume)
    watcher.start()
    try:
        assert train.main(argv + ["--out", one]) == 0  # meanwhile, the reference in this process
        watcher.join(timeout=900)
        assert seen.get("exits") == [0, 0], (seen, [open(log).read()[-3000:] for log in logs])
        assert len(seen["ckpts"]) == 1, seen["ckpts"]  # one checkpoint, written by process 0 for both
        stopped = int(seen["ckpts"][0].split("_")[1])
        assert 1 <= stopped < steps, f"the signal landed after step {stopped} of {steps}: no step left to resume"
        for log in logs:
            assert f"checkpoint written at step {stopped}; exiting" in open(log).read(), open(log).read()[-3000:]
        assert seen.get("resumed_exits") == [0, 0], (seen, [open(log).read()[-3000:] for log in resumed_logs])
    finally:
        for p in procs:
            p.kill()
        watcher.join()  # it returns once its processes have ended
    assert [json.loads(line)["step"] for line in open(os.path.join(two, "metrics.jsonl"))] == list(range(1, steps + 1))
    # Gloo's cross-process reductions add in another order than the in-process ones: float32 rounding.
    # Measured with tiny's first 4 stages (test_train.TINY): the losses agree to 1.6e-7 relative, the
    # parameters to 7.4e-6 and the BatchNorm statistics to 3.6e-7 (absolute). With all of tiny at 32x32
    # the last stages' maps are 1x1 and their training-mode BatchNorm averages 2 numbers per channel: there
    # rounding grew to 2e-4 relative in the third loss, and the test had to allow it; at 2x2 it does not.
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    last = f"ckpt_{steps:09d}"
    assert sorted(d for d in os.listdir(two) if "ckpt" in d) == [seen["ckpts"][0], last]
    # Adam divides each gradient by its own magnitude, so a parameter whose gradient is at rounding level
    # (a BatchNorm bias that the next BatchNorm removes, say) still moves by about the learning rate, in a
    # direction that rounding decides. The three steps' rates sum to 9e-5 (0, 3e-5, 6e-5): two runs can
    # differ by twice that, hence atol 2e-4 (for the BatchNorm statistics that follow them too).
    a, b = _params(os.path.join(two, last)), _params(os.path.join(one, last))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=2e-4, err_msg=k)
    saved = json.load(open(os.path.join(two, last, "train_state.json")))
    assert saved["step"] == steps and len(saved["data"]) == 2  # each process's loader position


def test_memory_report_prints_a_row_and_does_not_train(tmp_path, capsys):
    """--memory-report compiles the step and reads XLA's memory analysis (the same program as the runs
    above, so the compile cache has it); it prints one README table row and writes nothing."""
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--steps", "4", "--memory-report", "--vocab", synthetic.synthetic_vocab(), "--out", out]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = dict(zip(memory.MEMORY_COLUMNS, (c.strip() for c in row.strip("|").split("|"))))
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    size = {k: float(cells[k].split()[0]) * units[cells[k].split()[1]] for k in
            ("parameters", "optimizer state", "BN state", "arguments", "outputs", "temporaries", "total")}
    assert all(v > 0 for v in size.values()) and cells["pairs/device"] == "2"
    # LAMB and AdamW keep Adam's two moments per parameter; the arguments hold parameters, both states
    # and the batch.
    assert size["optimizer state"] >= 1.99 * size["parameters"]
    assert size["arguments"] >= 0.99 * (size["parameters"] + size["optimizer state"] + size["BN state"])
    assert not os.path.exists(out)


def test_out_of_memory_gets_a_hint(monkeypatch, capsys):
    """XLA's out-of-memory error (stood in for here: triggering one would need a real device) becomes one
    line pointing at --remat and the per-device batch."""
    def oom(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB.\nmore detail")
    monkeypatch.setattr(train, "train", oom)
    assert train.main(TINY) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: out of memory") and "--remat" in err


def test_barrier_falls_back_to_a_device_barrier_without_the_coordination_service():
    """train.wait_for_every_process reaches into JAX's internals for the coordination service's barrier
    (no public API); without a service (one process, or the internals moved) it uses the device barrier."""
    import jax
    assert not jax.distributed.is_initialized()
    train.wait_for_every_process("test: one process")  # returns: every process (this one) is there


def test_checkpoint_files_are_mapped_not_read(tmp_path):
    """weights.read_safetensors maps the file: an L2 checkpoint with its optimizer state is ~10 GB. A
    50 MB file reads back exactly (float32 as written big-endian, bfloat16 widened, integers, booleans,
    a 0-d scalar, an empty tensor) while Python allocates far less than the file; the arrays are
    read-only and outlive the call."""
    import struct
    import tracemalloc
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1250, 10_000), dtype=np.float32)  # 50 MB
    bf16 = (rng.standard_normal(100, dtype=np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    arrays = {"big": big.astype(">f4"), "ids": np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
              "mask": np.array([True, False, True]), "step": np.float64(7.5), "none": np.zeros((0, 3), np.float32)}
    path = str(tmp_path / "big.safetensors")
    weights.write_safetensors(path, arrays)
    # A bfloat16 tensor added by hand (write_safetensors writes what numpy has): its top 16 bits, appended.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(n)), f.read()
    header["half"] = {"dtype": "BF16", "shape": [10, 10], "data_offsets": [len(data), len(data) + 200]}
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data + (bf16.view(np.uint32) >> 16).astype("<u2").tobytes())
    del data

    tracemalloc.start()
    try:
        read = weights.read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.02 * os.path.getsize(path), f"{peak / 2**20:.1f} MiB allocated reading a 50 MB file"
    assert sorted(read) == sorted([*arrays, "half"])
    for k, a in arrays.items():
        assert read[k].dtype == np.dtype(a.dtype).newbyteorder("=") and read[k].shape == np.shape(a), k
        np.testing.assert_array_equal(read[k], a, err_msg=k)
    np.testing.assert_array_equal(read["half"], bf16.reshape(10, 10))
    assert not read["big"].flags.writeable
    with pytest.raises(ValueError):
        read["big"][0, 0] = 1.0
    assert float(read["big"][-1, -1]) == float(big[-1, -1])  # still mapped after the call returned


def test_failing_data_checkpoints_and_stops_with_one_line(tmp_path, capsys):
    """Bad samples are skipped and counted; when more than --max-bad-fraction of the last --bad-window
    samples fail, the run checkpoints its last step and exits 2 with one line naming the reasons, the
    shard and the flag (issue 14, item 1). The same step program as the other tiny runs: no new compile."""
    folder = tmp_path / "pairs"
    synthetic.write_synthetic(str(folder), 48, size=39)
    for name in ("000003.png", "000007.png", "000011.png"):
        (folder / name).write_bytes(b"not an image")
    out = str(tmp_path / "run")
    argv = TINY + ["--data", str(folder / "pairs.tsv"), "--out", out, "--skip-final-eval"]
    assert train.main(argv + ["--steps", "2"]) == 0  # 3 bad of 48: counted, never fatal
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readlines()[-1])
    assert row["skipped_not_image"] >= 1 and row["skipped_samples"] == row["skipped_not_image"]
    capsys.readouterr()
    assert train.main(argv + ["--steps", "6", "--max-bad-fraction", "0.02", "--bad-window", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines: one line
    assert err.startswith("error: data: ") and "not_image" in err and "--max-bad-fraction" in err and "pairs.tsv" in err
    steps = [json.load(open(os.path.join(c, "train_state.json")))["step"] for c in align.checkpoints(out)]
    assert steps[-1] >= 2 and f"checkpoint written at step {steps[-1]}" in err
