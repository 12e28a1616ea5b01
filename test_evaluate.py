"""Tests for evaluate.py and eval_sets.py: the linear probe's trainer, the shipped ImageNet names, then every
subcommand end to end through `evaluate.main` on a tiny saved checkpoint and small files written here.
The metric maths are tested in test_metrics.py."""
import csv
import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

import align
import eval_sets
import evaluate
import metrics
import synthetic

# ---------------------------------------------------------------- the probe trainer, the readers


def test_linear_probe_learns_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    label = rng.integers(0, 4, 400)
    x = (centres[label] + rng.normal(size=(400, 16))).astype(np.float32)
    w = evaluate.train_linear_probe(x, label, 4, epochs=5, batch_size=64)
    acc = metrics.classification_accuracy(np.c_[x, np.ones(400)], np.r_[w["kernel"], w["bias"][None]].T, label)
    assert acc["top1"] > 97


def test_shipped_imagenet_names_and_folder_mapping():
    names = open(os.path.join(eval_sets.EVAL_DATA, "imagenet_classnames.txt")).read().splitlines()
    wnids = open(os.path.join(eval_sets.EVAL_DATA, "imagenet_wnids.txt")).read().splitlines()
    templates = open(os.path.join(eval_sets.EVAL_DATA, "imagenet_templates.txt")).read().splitlines()
    assert len(names) == len(wnids) == 1000 and wnids == sorted(set(wnids)) and len(set(templates)) == 80
    assert all("{}" in t for t in templates) and "a photo of a {}." in templates
    assert eval_sets.class_names(["n01440764", "n01443537", "n15075141"]) == ["tench", "goldfish", "toilet paper"]
    assert eval_sets.class_names(["1", "999"]) == ["goldfish", "toilet paper"]  # ImageNetV2's folders
    assert eval_sets.class_names(["red_fox", "cat"]) == ["red fox", "cat"]


# ---------------------------------------------------------------- end to end, through the command line

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230)}
SIZE = 32


def tiny_checkpoint(path):
    """A tiny model saved with align.save. The weights are align.init's shapes filled by numpy: align.init
    draws each leaf with its own compiled jax.random call (~25 s for `tiny` on 2 cores)."""
    vocab = synthetic.synthetic_vocab(os.path.join(path, "vocab_src.txt"))
    with open(vocab) as f:
        vocab_size = sum(1 for _ in f)
    tiny = align.SIZES["tiny"]
    cfg = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=vocab_size), image_size=SIZE)
    shapes = jax.eval_shape(lambda: align.init(jax.random.key(0), cfg))
    rng = np.random.default_rng(0)

    def fill(key_path, leaf):
        name = jax.tree_util.keystr(key_path)
        if name.endswith(("['scale']", "['var']")):
            return np.ones(leaf.shape, np.float32)
        if name.endswith(("['bias']", "['mean']", "['temperature']")):
            return np.zeros(leaf.shape, np.float32)
        fan_in = math.prod(leaf.shape[-4:-1]) if "conv" in name else leaf.shape[-2]
        return (rng.normal(size=leaf.shape) / math.sqrt(max(fan_in, 1))).astype(np.float32)

    params, state = jax.tree_util.tree_map_with_path(fill, shapes)
    model = os.path.join(path, "model")
    align.save(model, params, state, cfg, vocab_path=vocab)
    return model


def write_image(path, colour, seed, fmt):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
    pixels[rng.integers(0, 30):, : rng.integers(10, 40)] //= 2  # a darker block, different per image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint; COCO-style Karpathy JSON with 6 test images (+1 corrupt, +1 train); CxC CSVs; class folders."""
    root = tmp_path_factory.mktemp("eval")
    out = {"root": root, "model": tiny_checkpoint(str(root)), "cache": str(root / "cache")}
    images, sentid = [], 0
    for i, colour in enumerate(["red", "green", "blue", "red", "green", "blue", "corrupt", "train"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        path = root / "coco" / "val2014" / name
        if colour == "corrupt":
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            write_image(str(path), COLOURS.get(colour, (128, 128, 128)), i, "JPEG" if i % 2 else "PNG")
        sentences = [{"raw": f"a photo of a {colour} square number {j}", "sentid": sentid + j} for j in range(5)]
        images.append({"filepath": "val2014", "filename": name, "split": "train" if colour == "train" else "test",
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        sentid += 5
    out["karpathy"] = str(root / "dataset_coco.json")
    with open(out["karpathy"], "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)

    # CxC's released format (header, COCO file names, COCO_val2014:sentid:N), one row with an unknown id
    cxc = root / "cxc"
    cxc.mkdir()
    cap = lambda s: f"COCO_val2014:sentid:{s}"
    img = lambda i: f"COCO_val2014_{i:012d}.jpg"
    tables = {
        "sts": (["caption1", "caption2"], [(cap(0), cap(15), 4.2), (cap(1), cap(6), 0.4), (cap(2), cap(20), 3.1),
                                           (cap(3), cap(12), 1.5), (cap(99999), cap(1), 2.0)]),
        "sis": (["image1", "image2"], [(img(0), img(3), 4.0), (img(1), img(2), 1.0), (img(4), img(1), 3.3),
                                       (img(5), img(0), 0.6)]),
        "sits": (["caption", "image"], [(cap(0), img(0), 4.9), (cap(5), img(3), 3.5), (cap(10), img(1), 0.2),
                                        (cap(25), img(2), 2.5)]),
    }
    for task, (cols, rows) in tables.items():
        with open(cxc / f"{task}_test.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols + ["agg_score", "sampling_method"])
            w.writerows([[a, b, s, "c2c_isim"] for a, b, s in rows])
    out["cxc"] = str(cxc)

    for split, count in (("train", 3), ("val", 2)):
        for c, colour in enumerate(COLOURS):
            for k in range(count):
                seed = 100 * c + k + 50 * (split == "val")
                write_image(str(root / "classes" / split / colour / f"{k}.png"), COLOURS[colour], seed, "PNG")
    return out


def run(files, *argv):
    out = str(files["root"] / f"{argv[0]}-{abs(hash(argv))}.json")
    result = evaluate.main([*argv, "--json", out, "--cache", files["cache"], "--batch-size", "4"])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    return result


def test_sharded_batches_equal_one_unsharded_call(files):
    """Embeddings from padded batches split over the 8 simulated devices equal one plain call on all rows."""
    model = evaluate.load_model(files["model"])
    params, state, cfg = align.load(files["model"])
    paths = eval_sets.list_images(str(files["root"] / "classes"))  # 15 images: two batches of 8, one padded
    emb, ok, skipped = evaluate.embed_image_files(model, paths, SIZE, batch=5)
    pixels = np.stack([evaluate.eval_pixels(p, SIZE) for p in paths]).astype(np.float32) / 127.5 - 1
    assert ok.all() and not skipped and jax.device_count() == 8
    np.testing.assert_allclose(emb, align.embed_images(params, state, pixels, cfg), atol=1e-5)
    texts = [f"a photo of {n} red circles" for n in range(20)]
    ids, mask = model.tokenizer.encode(texts, cfg.text.max_len)
    np.testing.assert_allclose(evaluate.embed_text_list(model, texts, batch=8),
                               align.embed_texts(params, ids, mask, cfg), atol=1e-5)


def assert_recalls(r, ks=(1, 5, 10)):
    values = [r[f"R@{k}"] for k in ks]
    assert all(0 <= v <= 100 for v in values) and values == sorted(values), r


def test_retrieval_cli(files):
    args = ("retrieval", "--checkpoint", files["model"], "--karpathy", files["karpathy"],
            "--images", str(files["root"] / "coco"))
    r = run(files, *args)
    assert set(r) == {"i2t", "t2i", "info"}
    assert_recalls(r["i2t"]), assert_recalls(r["t2i"])
    # the corrupt image is skipped and counted; its 5 captions leave with it; the train image is not in the split
    assert r["info"]["images"] == 6 and r["info"]["captions"] == 30
    assert r["info"]["skipped_images"]["corrupt_image"]["count"] == 1
    assert r["t2i"]["R@10"] == 100.0  # only 6 images
    assert run(files, *args) == r  # the second run reads the cache
    assert len(os.listdir(files["cache"])) >= 2


def test_retrieval_scores_saved_embeddings_in_annotation_order(files, tmp_path):
    # 7 test images in the JSON's order (the corrupt one too: embeddings need no decoding), 35 captions
    img = np.eye(7, 8, dtype=np.float32)
    txt = np.repeat(img, 5, axis=0) + 0.01 * np.random.default_rng(0).normal(size=(35, 8)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    np.save(tmp_path / "shifted.npy", np.roll(txt, 5, axis=0))  # every caption moved to the next image
    base = ("retrieval", "--karpathy", files["karpathy"], "--image-embeddings", str(tmp_path / "img.npy"))
    r = run(files, *base, "--text-embeddings", str(tmp_path / "txt.npy"))
    assert r["i2t"]["R@1"] == r["t2i"]["R@1"] == 100.0
    r = run(files, *base, "--text-embeddings", str(tmp_path / "shifted.npy"))
    assert r["i2t"]["R@1"] == r["t2i"]["R@1"] == 0.0


def test_zeroshot_cli(files, tmp_path):
    folder = str(files["root"] / "classes" / "val")
    r = run(files, "zeroshot", "--checkpoint", files["model"], "--images", folder)
    assert set(r) == {"top1", "top5", "info"} and 0 <= r["top1"] <= r["top5"] == 100.0  # 3 classes
    assert r["info"]["prompts"] == 80 and r["info"]["classes"] == 3 and r["info"]["images"] == 6
    assert r["info"]["image_size"] == SIZE  # the size the checkpoint records, with no --image-size
    single = run(files, "zeroshot", "--checkpoint", files["model"], "--images", folder, "--single-prompt")
    assert single["info"]["prompts"] == 1 and 0 <= single["top1"] <= 100
    # saved embeddings: [C, T, E] prompts are ensembled; images in sorted class folder order (blue, green, red)
    np.save(tmp_path / "img.npy", np.repeat(np.eye(3, dtype=np.float32), 2, axis=0))
    np.save(tmp_path / "txt.npy", np.repeat(np.eye(3, dtype=np.float32)[:, None], 4, axis=1))
    r = run(files, "zeroshot", "--images", folder, "--image-embeddings", str(tmp_path / "img.npy"),
            "--text-embeddings", str(tmp_path / "txt.npy"))
    assert r["top1"] == 100.0


def test_image_size_other_than_the_trained_one_warns(files, capsys):
    """--image-size overrides the checkpoint's training resolution, with a one-line warning."""
    folder = str(files["root"] / "classes" / "val")
    r = run(files, "zeroshot", "--checkpoint", files["model"], "--images", folder, "--image-size", "36")
    err = capsys.readouterr().err
    assert r["info"]["image_size"] == 36
    assert f"--image-size 36 differs from the {SIZE} the model was trained at" in err
    run(files, "zeroshot", "--checkpoint", files["model"], "--images", folder, "--image-size", str(SIZE))
    assert "differs" not in capsys.readouterr().err


def test_cxc_cli(files):
    r = run(files, "cxc", "--checkpoint", files["model"], "--karpathy", files["karpathy"],
            "--coco-images", str(files["root"] / "coco"), "--cxc", files["cxc"], "--bootstrap", "50")
    for task in ("i2t", "t2i", "t2t", "i2i"):
        assert_recalls(r[task])
    for task in ("sts", "sis", "sits"):
        assert -100 <= r[task]["mean"] <= 100 and r[task]["std"] >= 0
    assert -100 <= r["mean_avg"] <= 100
    assert r["info"]["pairs"] == {"sts": 4, "sis": 4, "sits": 4} and r["info"]["dropped_pairs"]["sts"] == 1


def test_knn_cli(files):
    r = run(files, "knn", "--checkpoint", files["model"], "--train", str(files["root"] / "classes" / "train"),
            "--val", str(files["root"] / "classes" / "val"))
    assert_recalls(r)
    assert r["R@10"] == 100.0  # 9 training images: every label is within the top 10
    assert r["info"]["train_images"] == 9 and r["info"]["val_images"] == 6


def test_linear_probe_cli(files):
    r = run(files, "linear-probe", "--checkpoint", files["model"], "--train", str(files["root"] / "classes" / "train"),
            "--val", str(files["root"] / "classes" / "val"), "--epochs", "3", "--probe-batch-size", "4")
    assert set(r) == {"top1", "top5", "info"} and 0 <= r["top1"] <= r["top5"] == 100.0
    assert r["info"]["features"] == align.SIZES["tiny"].image.features
    # Sec. 5.3 trains the probe at 289 and evaluates at 360: scaled to the trained 32, 40
    assert (r["info"]["train_size"], r["info"]["val_size"]) == (SIZE, 40)


def test_search_cli_writes_the_grid(files):
    index = str(files["root"] / "classes" / "train")
    grid = str(files["root"] / "grid.png")
    query_image = os.path.join(index, "red", "0.png")
    r = run(files, "search", "--checkpoint", files["model"], "--index", index, "--image", query_image,
            "--query", "blue", "--minus", "red", "--top-k", "4", "--grid", grid, "--thumb", "40")
    scores = [h["score"] for h in r["results"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert query_image not in [h["path"] for h in r["results"]]  # the query image itself is not a result
    with Image.open(grid) as im:
        assert im.size == (40 * 5, 24 + 40 + 18)  # the query image and 4 results
    r = run(files, "search", "--checkpoint", files["model"], "--index", index, "--query", "a green square",
            "--top-k", "9", "--grid", grid, "--thumb", "40")
    assert len(r["results"]) == 9 and len({h["path"] for h in r["results"]}) == 9
    with Image.open(grid) as im:
        assert im.size == (40 * 9, 24 + 40 + 18)


def test_embed_cli_writes_rows_in_order_with_their_listing(files):
    """`embed`: sorted image files, then caption lines -> the model's L2-normalised float32 embeddings,
    each .npy with a .txt beside it naming its rows."""
    folder, out = str(files["root"] / "classes"), files["root"] / "embedded"
    r = run(files, "embed", "--checkpoint", files["model"], "--images", folder, "--out", str(out / "img.npy"))
    paths = (out / "img.txt").read_text().splitlines()
    assert paths == eval_sets.list_images(folder) == sorted(paths) and len(paths) == 15  # both splits' folders
    img = np.load(out / "img.npy")
    params, state, cfg = align.load(files["model"])
    pixels = np.stack([evaluate.eval_pixels(p, SIZE) for p in paths]).astype(np.float32) / 127.5 - 1
    assert img.dtype == np.float32 and img.shape == (15, cfg.embed_dim) and r["shape"] == [15, cfg.embed_dim]
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(img, align.embed_images(params, state, pixels, cfg), atol=1e-5)

    (files["root"] / "captions.txt").write_text("a red square\n\nTwo BLUE circles, left\n")
    run(files, "embed", "--checkpoint", files["model"], "--texts", str(files["root"] / "captions.txt"),
        "--out", str(out / "txt"))  # .npy added
    texts = (out / "txt.txt").read_text().splitlines()
    assert texts == ["a red square", "Two BLUE circles, left"]  # the blank line is no row
    ids, mask = evaluate.load_model(files["model"]).tokenizer.encode(texts, cfg.text.max_len)
    np.testing.assert_allclose(np.load(out / "txt.npy"), align.embed_texts(params, ids, mask, cfg), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["retrieval", "--karpathy", "missing.json", "--images", "."], "missing.json: no such file"),
    (["retrieval", "--karpathy", "{karpathy}", "--split", "val", "--images", "."],
     "no image has split 'val' (it has test, train)"),
    (["zeroshot", "--checkpoint", "{model}", "--images", "{empty}"], "no image in 0 subfolders"),
    (["knn", "--checkpoint", "nowhere", "--train", ".", "--val", "."], "nowhere: no such model or run directory"),
    (["embed", "--checkpoint", "{model}", "--out", "x.npy"], "pass --images DIR or --texts FILE"),
])
def test_bad_input_gives_one_line_error(files, capsys, argv, message):
    (files["root"] / "empty").mkdir(exist_ok=True)
    argv = [a.format(karpathy=files["karpathy"], model=files["model"], empty=files["root"] / "empty") for a in argv]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--no-cache"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith(f"evaluate.py {argv[0]}: error:")
