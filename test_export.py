"""`python align.py export`: a checkpoint out to HF, read back through HF's own AlignProcessor and AlignModel.

The round trip a user makes: image files and strings through `AlignProcessor.from_pretrained(DIR)` and
`AlignModel.from_pretrained(DIR)` must give the embeddings evaluate.py computes from the same files.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import align
import data
import evaluate
import synthetic
from test_evaluate import tiny_checkpoint, write_image  # numpy-filled weights: align.init compiles for ~25 s


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint with non-trivial BatchNorm statistics, exported through the command line."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_checkpoint(str(root))
    params, state, cfg = align.load(model)
    rng = np.random.default_rng(1)

    def statistics(key_path, x):
        # Running statistics that a wrong eps or layout would show, and small variances that undo the numpy
        # weights' shrinking (their features are about 1e-8; with these, 5 to 15 and image-dependent).
        name = jax.tree_util.keystr(key_path)
        if "var" not in name:
            return rng.normal(0, 0.1, x.shape).astype(np.float32)
        low = 0.06 if "project_bn" in name else 0.3
        return rng.uniform(low, 2.5 * low, x.shape).astype(np.float32)

    state = jax.tree_util.tree_map_with_path(statistics, state)
    align.save(model, params, state, cfg, vocab_path=os.path.join(root, "vocab_src.txt"))
    align.main(["export", "--checkpoint", model, "--out", str(root / "hf")])
    return {"root": root, "model": model, "hf": str(root / "hf"), "cfg": cfg}


def test_export_writes_a_complete_hf_directory(exported):
    hf, cfg = exported["hf"], exported["cfg"]
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                      "tokenizer_config.json", "vocab.txt"]
    with open(os.path.join(hf, "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert pre["crop_size"]["height"] == cfg.image_size == 32
    assert pre["size"]["height"] == data.resize_for(cfg.image_size) == 38  # 346/289 of the crop
    with open(os.path.join(hf, "tokenizer_config.json")) as f:
        assert json.load(f)["model_max_length"] == cfg.text.max_len


def test_hf_processor_and_model_give_our_embeddings(exported, tmp_path):
    """PNG files of two shapes, a small JPEG and strings (one truncated, one uncased, one accented) through
    HF's AlignProcessor and AlignModel give evaluate.py's ids, pixels (57 px squares) and embeddings."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf, cfg = exported["hf"], exported["cfg"]
    synthetic.write_synthetic(str(tmp_path), 2, size=57)
    write_image(str(tmp_path / "wide.png"), (40, 80, 230), 3, "PNG")    # 48 x 40: squashed, as data.py does
    write_image(str(tmp_path / "small.jpg"), (220, 40, 40), 4, "JPEG")  # too small for JPEG draft decoding
    paths = sorted(str(tmp_path / p) for p in os.listdir(tmp_path) if p.endswith((".png", ".jpg")))
    texts = ["a red circle", "Two BIG blue squares, top-left!", "café " * 40]

    processor = transformers.AlignProcessor.from_pretrained(hf)
    hf_model = transformers.AlignModel.from_pretrained(hf).eval()
    inputs = processor(text=texts, images=[Image.open(p) for p in paths], return_tensors="pt")
    pixels = np.stack([evaluate.eval_pixels(p, cfg.image_size) for p in paths]) / np.float32(127.5) - 1
    with torch.no_grad():
        out = hf_model(**inputs)
        on_our_pixels = hf_model(**{**inputs, "pixel_values": torch.tensor(pixels.transpose(0, 3, 1, 2))})

    model = evaluate.load_model(exported["model"])
    ours_img, ok, _ = evaluate.embed_image_files(model, paths, cfg.image_size)
    ours_txt = evaluate.embed_text_list(model, texts)
    ids, mask = model.tokenizer.encode(texts, cfg.text.max_len)
    hf_pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)

    np.testing.assert_array_equal(inputs["input_ids"].numpy(), ids)
    np.testing.assert_array_equal(inputs["attention_mask"].numpy(), mask)
    np.testing.assert_allclose(out.text_embeds.numpy(), ours_txt, atol=1e-4)  # measured 1e-7
    square = [i for i, p in enumerate(paths) if Image.open(p).width == Image.open(p).height]
    np.testing.assert_array_equal(hf_pixels[square], pixels[square])
    # data.py resamples the crop's source box once, HF resizes the whole image then crops: where the box's
    # corners are not exact in binary (48/38; 57/38 = 1.5 is), PIL rounds the filter weights differently.
    assert np.abs(hf_pixels - pixels).max() <= 1.01 / 127.5
    assert ok.all() and np.abs(ours_img[0] - ours_img[1]).max() > 0.05  # the embeddings depend on the image
    np.testing.assert_allclose(on_our_pixels.image_embeds.numpy(), ours_img, atol=1e-4)  # measured 3e-7
    np.testing.assert_allclose(out.image_embeds.numpy()[square], ours_img[square], atol=1e-4)  # measured 1.7e-7
    # The two non-square images, from files: measured 2.7e-4 (small.jpg) and 8.4e-4 (wide.png).
    np.testing.assert_allclose(out.image_embeds.numpy(), ours_img, atol=5e-3)
    params, _, _ = align.load(exported["model"])
    assert hf_model.temperature.item() == pytest.approx(float(align.temperature(params, cfg)), rel=1e-6)


def test_large_jpegs_differ_only_by_draft_decoding(exported, tmp_path):
    """data.decode_image decodes a JPEG at 1/2 to 1/8 scale when that still covers the resize (PIL's draft);
    HF's processor gets the image as the user opened it. Opened with the same draft, only the crop box's
    rounding (above) is left."""
    transformers = pytest.importorskip("transformers")
    cfg = exported["cfg"]
    pixels, _ = synthetic.synthetic_example(0, 5, 400, 1)
    noisy = np.asarray(Image.fromarray(pixels).resize((480, 360))).astype(np.float32)
    noisy += np.random.default_rng(0).normal(0, 20, noisy.shape)
    path = str(tmp_path / "big.jpg")
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, "JPEG")
    processor = transformers.AlignProcessor.from_pretrained(exported["hf"])
    ours = evaluate.eval_pixels(path, cfg.image_size).astype(np.float32) / 127.5 - 1
    hf_px = lambda img: processor(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    full = np.abs(hf_px(Image.open(path)) - ours).max() * 127.5
    assert 0 < full <= 16  # grey levels; measured 10 (mean 0.7) at 480 x 360 -> 38
    drafted = Image.open(path)
    drafted.draft("RGB", (data.resize_for(cfg.image_size),) * 2)
    assert np.abs(hf_px(drafted) - ours).max() <= 1.01 / 127.5  # what is left: the crop box's rounding (above)


def test_export_refuses_what_hf_cannot_hold_in_one_line(exported, tmp_path, capsys):
    params, state, cfg = align.load(exported["model"])
    projected = align.Config("p", cfg.image, cfg.text, embed_dim=16, image_size=32)  # an image projection
    p2, s2 = jax.eval_shape(lambda: align.init(jax.random.key(0), projected))
    p2 = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), p2)
    align.save(str(tmp_path / "projected"), p2, state, projected,
               vocab_path=os.path.join(exported["model"], "vocab.txt"))
    for argv, message in [(["--checkpoint", str(tmp_path / "projected")], "no image projection"),
                          (["--checkpoint", exported["model"], "--image-size", "33"], "is odd"),
                          (["--checkpoint", str(tmp_path / "nowhere")], "no such model or run directory")]:
        with pytest.raises(SystemExit) as e:
            align.main(["export", *argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and "\n" not in err and err.startswith("align.py export: error:")
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_an_odd_training_size_is_exported_one_pixel_smaller_with_a_warning(exported, tmp_path, capsys):
    """Sec. 5's 289 is odd, where HF's padding cannot equal our "SAME" (align.to_hf): HF gets 288, and says so."""
    params, state, cfg = align.load(exported["model"])
    odd = str(tmp_path / "odd")
    align.save(odd, params, state, dataclasses.replace(cfg, image_size=33),
               vocab_path=os.path.join(exported["model"], "vocab.txt"))
    align.main(["export", "--checkpoint", odd, "--out", str(tmp_path / "hf")])
    assert "evaluate.py --image-size 32" in capsys.readouterr().err
    with open(tmp_path / "hf" / "preprocessor_config.json") as f:
        pre = json.load(f)
    assert pre["crop_size"] == {"height": 32, "width": 32} and pre["size"]["height"] == data.resize_for(32)


def test_bare_command_line_still_prints_the_size_table(capsys):
    align.main([])
    out = capsys.readouterr().out
    assert out.startswith("| size |") and "| L2 | EfficientNet-L2 | BERT-Large | 1376 |" in out
