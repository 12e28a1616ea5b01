"""Sec. 5.1's retrieval fine-tuning through train.py: --finetune needs --init and takes its model, a
Karpathy JSON is the training data (train + restval splits) and the held-out set (val, scored as
`evaluate.py retrieval` scores it), and the same command resumes after a stop whatever --init was.

A Karpathy JSON of generated images (synthetic.py's scenes, each with its caption and two variants).
"""
import dataclasses
import json
import os

import jax
import numpy as np

import align
import synthetic
import train


def _karpathy(tmp_path, per_split=(("train", 24), ("restval", 8), ("val", 8))):
    """images/ and dataset.json: per split, that many scenes, each with three captions."""
    images, rows, i = tmp_path / "images", [], 0
    os.makedirs(images)
    for split, count in per_split:
        for _ in range(count):
            pixels, caption = synthetic.synthetic_example(5, i, 38, 0)
            from PIL import Image
            Image.fromarray(pixels).save(images / f"{i:04d}.png")
            sentences = [caption, caption.replace(" and ", " with "), "a picture of " + caption]
            rows.append({"filename": f"{i:04d}.png", "split": split, "sentences": [{"raw": c} for c in sentences]})
            i += 1
    with open(tmp_path / "dataset.json", "w") as f:
        json.dump({"images": rows}, f)
    return str(tmp_path / "dataset.json"), str(images)


def _pretrained(path, max_len=24):
    """A tiny model directory with the synthetic vocabulary, as a pre-training run would leave."""
    cfg = align.SIZES["tiny"]
    image = dataclasses.replace(cfg.image, stages=cfg.image.stages[:4])  # test_train.TINY's model
    cfg = dataclasses.replace(cfg, image=image, embed_dim=image.features)  # no projection, as tiny (and HF)
    vocab = synthetic.synthetic_vocab()
    with open(vocab) as f:
        n = sum(1 for _ in f)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=n, max_len=max_len))
    params, state = align.init(jax.random.key(3), cfg)
    align.save(str(path), jax.device_get(params), jax.device_get(state), cfg, vocab_path=vocab)
    return cfg


FINETUNE = ["--finetune", "flickr30k", "--batch-size", "16", "--steps", "4", "--dtype", "float32", "--workers", "0",
            "--log-every", "1", "--eval-every", "2"]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def test_finetune_on_a_karpathy_json_stops_and_resumes(tmp_path, capsys):
    karpathy, images = _karpathy(tmp_path)
    model = tmp_path / "pretrained"
    init_cfg = _pretrained(model)
    argv = FINETUNE + ["--init", str(model), "--data", karpathy, "--images", images, "--eval-data", karpathy]
    # Without --init: one line, nothing trained.
    assert train.main(FINETUNE + ["--data", karpathy, "--images", images, "--out", str(tmp_path / "x")]) == 2
    assert "--finetune flickr30k needs --init" in capsys.readouterr().err
    # A JSON without training captions: one line.
    with open(tmp_path / "val_only.json", "w") as f:
        json.dump({"images": [{"filename": "0000.png", "split": "val", "sentences": [{"raw": "a red circle"}]}]}, f)
    assert train.main(argv[:-6] + ["--data", str(tmp_path / "val_only.json"), "--images", images,
                                   "--out", str(tmp_path / "y")]) == 2
    assert "has no caption in the splits ('train', 'restval')" in capsys.readouterr().err
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    assert train.main(argv + ["--out", straight]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(straight, "config.json")) as f:
        config = json.load(f)
    # Sec. 5.1's recipe (LAMB, lr 1e-5, no warm-up) on --init's model at its own image size and text length.
    assert config["recipe"]["optimizer"] == "lamb" and config["recipe"]["lr"] == 1e-5
    assert config["recipe"]["image_size"] == init_cfg.image_size == 32
    assert config["model"]["text"]["max_len"] == 24 and config["model"]["image"]["name"] == "tiny"
    # The training data: every caption of the 24 train and 8 restval images; 64 = 4 steps x 16 pairs read.
    assert "data: 64 samples read, 0 skipped" in out
    # Held-out retrieval on the val split, 8 images with 3 captions each, every 2 steps and at the end.
    with open(os.path.join(straight, "heldout.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["images"], r["captions"]) for r in rows] == [(2, 8, 24), (4, 8, 24)]
    assert "held-out retrieval on 8 images and 24 captions" in out
    with open(os.path.join(straight, "retrieval.json")) as f:
        assert json.load(f)["i2t"]["R@1"] == rows[-1]["i2t"]["R@1"]
    # Stopped after 2 steps, then the same command resumes: the uninterrupted run's losses.
    assert train.main(argv + ["--out", stopped, "--stop-after", "2"]) == 0
    assert train.main(argv + ["--out", stopped]) == 0
    np.testing.assert_allclose(_losses(stopped), _losses(straight), rtol=1e-6)


def test_init_from_hf_trains_at_64_tokens_and_resumes(tmp_path):
    """An HF directory's 128-row position table (512 in kakaobrain/align-base) trains at Sec. 5's 64 tokens;
    the run resumes although its model is not --size's."""
    ours = tmp_path / "ours"
    cfg = _pretrained(ours, max_len=128)
    params, state, _ = align.load(str(ours))
    hf = str(tmp_path / "hf")
    align.to_hf(params, state, cfg, hf, image_size=32)
    out = str(tmp_path / "run")
    argv = ["--init", hf, "--vocab", synthetic.synthetic_vocab(), "--batch-size", "16", "--steps", "2",
            "--workers", "0", "--skip-final-eval", "--out", out]
    assert train.main(argv + ["--stop-after", "1"]) == 0
    _, _, run_cfg = align.load(out)
    assert run_cfg.text.max_len == 64
    assert train.main(argv) == 0
    tuned, _, _ = align.load(out)
    np.testing.assert_array_equal(tuned["text"]["embeddings"]["position"].shape, (64, cfg.text.width))
