"""The evaluation sets' files, read for evaluate.py: Karpathy-split JSON, class folders, CxC's CSVs, saved embeddings.

  read_karpathy                    Flickr30K 1K and MSCOCO 5K test captions   Sec. 5.1, Table 1
  read_cxc                         Crisscrossed Captions' judgements          Sec. 5.1, Tables 2-3
  read_class_folders, class_names  ImageNet's layout (also -R, -A, -V2) and   Sec. 5.2, 5.3, 6: Tables 4-5, 8-10
                                   its readable class names (eval_data/)
  list_images                      the images of a folder to search           Sec. 7, Figures 4-5
  load_npy, same_width             embeddings computed elsewhere (--image-embeddings, --text-embeddings)

Each returns plain lists and numpy arrays (rows: N images, M captions, P pairs, C classes) in a fixed
order, the order that saved embeddings must follow. Bad input raises UsageError with one line that names
the flag, what is wrong and how to fix it; evaluate.py prints it and exits 2.

Deviations from the paper and the reference protocols:
  - Karpathy MSCOCO gives a few images 6 or 7 captions; like the paper's "5K test set" (25K captions)
    read_karpathy keeps the first five of each (`captions_per_image`, 0 keeps all).
"""
import csv
import json
import os

import numpy as np

import data

EVAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_data")


class UsageError(ValueError):
    """Bad input, reported as one line that says what is wrong and how to fix it."""


def _load_json(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e})")


def read_karpathy(path, split, images_dir, captions_per_image=5):
    """A Karpathy-split JSON -> (image paths [N], captions [M], txt_to_img [M], sentids [M], filenames [N]).

    Format (Flickr30K 1K test, MSCOCO 5K test): {"images": [{"filename", "filepath"?, "split",
    "sentids"?, "sentences": [{"raw", "sentid"?}, ...]}, ...]}. An image is looked for at
    images_dir/filepath/filename, then at images_dir/filename.
    """
    ann = _load_json(path, "--karpathy")
    if not isinstance(ann, dict) or not isinstance(ann.get("images"), list):
        raise UsageError(f"--karpathy {path}: expected a Karpathy-split JSON with an 'images' list")
    chosen = [im for im in ann["images"] if im.get("split") == split]
    if not chosen:
        splits = sorted({str(im.get("split")) for im in ann["images"]})
        raise UsageError(f"--karpathy {path}: no image has split {split!r} (it has {', '.join(splits)}); pass --split")
    paths, captions, txt_to_img, sentids, names = [], [], [], [], []
    try:
        for i, im in enumerate(chosen):
            paths.append(data.karpathy_image_path(images_dir, im))
            names.append(im["filename"])
            sents = im["sentences"]
            for j, s in enumerate(sents[:captions_per_image or None]):
                captions.append(s["raw"])
                txt_to_img.append(i)
                sentids.append(s.get("sentid", (im.get("sentids") or [None] * len(sents))[j]))
    except KeyError as e:
        raise UsageError(f"--karpathy {path}: an image of split {split!r} has no {e}; expected filename and "
                         "sentences [{raw}] (Karpathy's dataset_*.json)")
    if images_dir is not None and not any(os.path.exists(p) for p in paths):
        raise UsageError(f"--images {images_dir}: none of the {len(paths)} {split} images is there "
                         f"(looked for DIR/filepath/filename and DIR/filename, e.g. {paths[0]})")
    return paths, captions, np.array(txt_to_img, np.int64), sentids, names


def _is_image(name):
    return name.lower().rsplit(".", 1)[-1] in data.IMAGE_EXTS


def list_images(folder):
    """Every image file under `folder`, recursively, in sorted order."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder")
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if _is_image(f))
    if not found:
        raise UsageError(f"{folder}: no images ({', '.join(data.IMAGE_EXTS)}) in it or below it")
    return found


def read_class_folders(folder):
    """One subfolder per class (ImageNet's layout) -> (paths [N], labels [N], class folder names [C]).

    Classes are the subfolders in sorted order (numerically when all are integers, as ImageNetV2's
    0..999); images are sorted within each. This is the row order of --image-embeddings.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder")
    dirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if dirs and all(d.isdigit() for d in dirs):
        dirs.sort(key=int)
    paths, labels = [], []
    for c, d in enumerate(dirs):
        files = sorted(f for f in os.listdir(os.path.join(folder, d)) if _is_image(f))
        paths += [os.path.join(folder, d, f) for f in files]
        labels += [c] * len(files)
    if not paths:
        raise UsageError(f"{folder}: expected one subfolder of images per class, found no image in "
                         f"{len(dirs)} subfolders")
    return paths, np.array(labels, np.int64), dirs


def read_lines(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def class_names(dirs, classnames_file=None):
    """Readable names for class folders: a file listing them in folder order, or a list indexed by
    ImageNet synset (n01440764 ...: the 1000 in sorted order, or a subset such as ImageNet-R/A's 200) or
    by integer folder names (ImageNetV2); with no file, the shipped ImageNet names (CLIP's cleaned list)
    for synset or integer folders, else the folder names themselves."""
    wnids = read_lines(os.path.join(EVAL_DATA, "imagenet_wnids.txt"), "eval_data")
    synsets = all(d in set(wnids) for d in dirs)
    numbered = all(d.isdigit() for d in dirs)
    if classnames_file is None and not (synsets or numbered):
        return [d.replace("_", " ") for d in dirs]
    flag = "--classnames"
    names = read_lines(classnames_file or os.path.join(EVAL_DATA, "imagenet_classnames.txt"), flag)
    if len(names) == len(dirs):
        return names
    if synsets and len(names) == len(wnids):
        return [names[wnids.index(d)] for d in dirs]
    if numbered and all(int(d) < len(names) for d in dirs):
        return [names[int(d)] for d in dirs]
    raise UsageError(f"{flag} {classnames_file}: {len(names)} names for {len(dirs)} class folders; give one "
                     "name per folder in sorted folder order (or 1000 ImageNet names for synset folders)")


def load_npy(path, rows, flag, what):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    x = np.load(path)
    if len(x) != rows:
        raise UsageError(f"{flag} {path}: {len(x)} rows, expected {rows} ({what})")
    return x.astype(np.float32)


def same_width(img, txt):
    if img.shape[-1] != txt.shape[-1]:
        raise UsageError(f"image embeddings are {img.shape[-1]} wide but text embeddings {txt.shape[-1]}: "
                         "they must come from the same model")


CXC_COLUMNS = {"sts": ("caption1", "caption2"), "sis": ("image1", "image2"), "sits": ("caption", "image")}


def read_cxc(cxc_dir, split, image_index, caption_index):
    """CxC's released CSVs (github.com/google-research-datasets/Crisscrossed-Captions, data/):
    {sts,sis,sits}_{val,test}.csv with a header and columns caption1,caption2 / image1,image2 /
    caption,image, then agg_score (0-5) and sampling_method. Images are COCO file names
    (COCO_val2014_000000391895.jpg), captions are Karpathy sentids written COCO_val2014:sentid:770337.

    Returns ({task: (a_P, b_P, score_P)}, {task: dropped}): row indices into the images or captions
    (image_index and caption_index map file names and sentids to rows), and how many rows named an id
    outside the split.
    """
    out, dropped = {}, {}
    for task, cols in CXC_COLUMNS.items():
        path = os.path.join(cxc_dir, f"{task}_{split}.csv")
        if not os.path.isfile(path):
            raise UsageError(f"--cxc {cxc_dir}: no {task}_{split}.csv; download data/ from "
                             "github.com/google-research-datasets/Crisscrossed-Captions")
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not all(c in rows[0] for c in cols + ("agg_score",)):
            raise UsageError(f"--cxc {path}: expected columns {', '.join(cols)}, agg_score; found {', '.join(rows[0])}")

        def index(col, value):
            if col.startswith("image"):
                return image_index.get(value)
            sentid = value.rsplit(":", 1)[-1]
            return caption_index.get(int(sentid)) if sentid.isdigit() else None

        a, b, score, dropped[task] = [], [], [], 0
        for r in rows:
            i, j = index(cols[0], r[cols[0]]), index(cols[1], r[cols[1]])
            if i is None or j is None:
                dropped[task] += 1
                continue
            a.append(i), b.append(j), score.append(float(r["agg_score"]))
        out[task] = (np.array(a, np.int64), np.array(b, np.int64), np.array(score))
    return out, dropped
