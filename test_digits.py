"""Learning on real images: digits.py's check, end to end through the command lines.

scikit-learn ships the digits (no download); without it these tests are skipped. The end-to-end check
trains for minutes, more than the suite's budget on a 2-core CPU, so it runs only when asked:
ALIGN_LONG_TESTS=1 python -m pytest -q test_digits.py (or `python digits.py --out runs/digits`, whose
result the README gives).
"""
import os
import tarfile

import pytest

pytest.importorskip("sklearn")
import digits  # noqa: E402


def test_digits_split_is_disjoint_deterministic_and_noisy(tmp_path):
    """No held-out digit is trained on; a seed writes the same bytes; the noisy share is the one asked for."""
    counts = digits.write(str(tmp_path / "a"), seed=3, noisy=0.2)
    digits.write(str(tmp_path / "b"), seed=3, noisy=0.2)
    train_keys = set()
    for name in sorted(os.listdir(tmp_path / "a" / "shards")):
        shard = tmp_path / "a" / "shards" / name
        assert shard.read_bytes() == (tmp_path / "b" / "shards" / name).read_bytes()
        with tarfile.open(shard) as tar:
            train_keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    heldout_keys = {f.split(".")[0] for _, _, files in os.walk(tmp_path / "a" / "heldout") for f in files}
    assert not train_keys & heldout_keys
    assert (len(train_keys), len(heldout_keys)) == (counts["train"], counts["heldout"])
    assert len(train_keys) + len(heldout_keys) == 1797
    assert sorted(os.listdir(tmp_path / "a" / "heldout")) == sorted(digits.WORDS)
    noisy = (counts["wrong"] + counts["unrelated"]) / counts["train"]
    assert 0.17 < noisy < 0.23 and counts["wrong"] > 0 and counts["unrelated"] > 0


@pytest.mark.skipif(not os.environ.get("ALIGN_LONG_TESTS"), reason="minutes of training: set ALIGN_LONG_TESTS=1")
def test_tiny_model_learns_digits_zero_shot(tmp_path, monkeypatch):
    """python train.py --size tiny on noisy captioned digits, then evaluate.py zeroshot's default prompts."""
    # Train and evaluate on one CPU device: conftest's 8 simulated devices only add compile time and
    # per-step overhead on a 2-core machine. Other XLA flags are kept.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("ALIGN_EVAL_CACHE", str(tmp_path / "eval_cache"))  # not the user's ~/.cache
    result = digits.check(str(tmp_path / "digits"), seed=0)
    assert result["info"]["images"] == result["counts"]["heldout"]
    assert result["top1"] >= 90, result
