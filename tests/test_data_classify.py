"""Synthetic shapes dataset and the ImageFolder reader."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch

from edgedeploy.data.imagefolder import ImageFolderDataset, load_imagefolder, read_class_names
from edgedeploy.data.preprocess import to_input_tensor
from edgedeploy.data.synthetic_classify import SHAPES, make_synthetic_classification
from edgedeploy.errors import DatasetError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_synthetic_is_deterministic_reused_and_regenerated(tmp_path):
    a = make_synthetic_classification(tmp_path / "a", num_classes=3, train_per_class=4, val_per_class=2, imgsz=32,
                                      seed=7, progress=False)
    b = make_synthetic_classification(tmp_path / "b", num_classes=3, train_per_class=4, val_per_class=2, imgsz=32,
                                      seed=7, progress=False)
    c = make_synthetic_classification(tmp_path / "c", num_classes=3, train_per_class=4, val_per_class=2, imgsz=32,
                                      seed=8, progress=False)
    assert _tree_bytes(a) == _tree_bytes(b)
    assert _tree_bytes(a).keys() == _tree_bytes(c).keys() and _tree_bytes(a) != _tree_bytes(c)
    assert (a / "classes.txt").read_text().split() == list(SHAPES[:3])
    assert len(list((a / "train").rglob("*.jpg"))) == 12 and len(list((a / "val").rglob("*.jpg"))) == 6

    # same parameters: reused untouched; other parameters: regenerated in place
    stamp = (a / "train" / "circle" / "00000.jpg").stat().st_mtime_ns
    make_synthetic_classification(a, num_classes=3, train_per_class=4, val_per_class=2, imgsz=32, seed=7,
                                  progress=False)
    assert (a / "train" / "circle" / "00000.jpg").stat().st_mtime_ns == stamp
    make_synthetic_classification(a, num_classes=2, train_per_class=3, val_per_class=1, imgsz=32, seed=7,
                                  progress=False)
    assert json.loads((a / "manifest.json").read_text())["num_classes"] == 2
    assert len(list((a / "train").rglob("*.jpg"))) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_synthetic_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        make_synthetic_classification(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, progress=False)
    assert (tmp_path / "mine.txt").exists()


def _pixels(ds: ImageFolderDataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(len(ds)):
        img, y = ds.read_bgr(i)
        xs.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() / 255.0)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def test_linear_classifier_on_pixels_does_not_solve_synthetic(tmp_path):
    """The CNN target is >= 90%; a multinomial logistic regression on raw (downsampled) pixels, trained to
    convergence with L-BFGS, must stay far below it: colour and position do not give the class away.
    """
    root = make_synthetic_classification(tmp_path / "s", num_classes=6, train_per_class=150, val_per_class=50,
                                         imgsz=64, seed=0, progress=False)
    train, val = load_imagefolder(root, 64, MEAN, STD, augment=False)
    xtr, ytr = _pixels(train, 16)
    xva, yva = _pixels(val, 16)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(0)
    linear = torch.nn.Linear(xtr.shape[1], 6)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), ytr) + 1e-2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = (linear(xtr).argmax(1) == ytr).float().mean().item()
        val_acc = (linear(xva).argmax(1) == yva).float().mean().item()
    print(f"linear on 16x16 pixels: train {train_acc:.3f}  val {val_acc:.3f} (chance {1 / 6:.3f})")
    assert train_acc > val_acc + 0.2  # it did fit the training set: the failure to generalise is real
    assert val_acc < 0.6


def _write_tree(root, classes=("cat", "dog"), per_class=3, size=24):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)
                cv2.imwrite(str(root / split / name / f"{i}.png"), img)
    return root


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = _write_tree(tmp_path)
    (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "page.jpg").write_text("<html>404 not found</html>")
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "truncated.png").write_bytes(good[:60])  # valid signature, undecodable body
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="edgedeploy.data"):
        ds = ImageFolderDataset(root, "train", 16, MEAN, STD, augment=True)
    # every file left out is counted and named: not-an-image by signature, and other formats (a .txt, a .gif)
    assert sorted(p.name for p in ds.skipped) == ["empty.jpg", "notes.txt", "page.jpg"]
    assert "skipped 3 file(s)" in caplog.text and "dog/notes.txt" in caplog.text
    assert len(ds) == 7  # 6 good + the truncated one, caught at load time
    index = [p.name for p, _ in ds.samples].index("truncated.png")
    x, y = ds[index]
    assert ds.load_failures == 1 and tuple(x.shape) == (3, 16, 16) and x.dtype == torch.float32
    assert y == ds.samples[(index + 1) % len(ds)][1]  # replaced by the next sample in the list
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.isfinite(xs).all() and xs.std() > 0.5  # normalised, not blank


def test_missing_and_malformed_layouts_say_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="(?s)not found.*DATA/train/<class>"):
        ImageFolderDataset(tmp_path / "nope", "train", 16, MEAN, STD)
    (tmp_path / "flat").mkdir()
    cv2.imwrite(str(tmp_path / "flat" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_imagefolder(tmp_path / "flat", 16, MEAN, STD)
    root = _write_tree(tmp_path / "novalsplit")
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match="no val/valid/validation folder"):
        load_imagefolder(root, 16, MEAN, STD)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no readable images"):
        load_imagefolder(empty, 16, MEAN, STD)
    extra = _write_tree(tmp_path / "extra")
    (extra / "val" / "bird").mkdir()
    with pytest.raises(DatasetError, match="bird"):
        load_imagefolder(extra, 16, MEAN, STD)


def test_eval_items_are_the_deployment_preprocessing(tmp_path):
    root = _write_tree(tmp_path, classes=("b", "a"))
    assert read_class_names(root) == ["a", "b"]  # sorted folders without classes.txt
    (root / "classes.txt").write_text("b\na\n")
    train, val = load_imagefolder(root, 20, MEAN, STD)
    assert train.classes == val.classes == ["b", "a"]
    x, y = val[0]
    path, label = val.samples[0]
    ref, _, _ = to_input_tensor(cv2.imread(str(path)), 20, MEAN, STD)
    assert y == label == 0
    np.testing.assert_array_equal(x.numpy(), ref[0])
    xa, _ = train[0]  # augmented: same size, different pixels
    assert xa.shape == x.shape and not torch.allclose(xa, x)
