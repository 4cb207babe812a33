"""VOC-style segmentation data: layouts, the synthetic set, aligned augmentation and actionable errors."""

import numpy as np
import pytest
from PIL import Image

from edgedeploy.data.synthetic_segment import CLASSES, make_synthetic_segmentation
from edgedeploy.data.voc import (
    VOC_CLASSES,
    find_pairs,
    open_segmentation_data,
    read_mask,
    train_transform,
    voc_palette,
)
from edgedeploy.errors import DatasetError


def _save_mask(path, arr, palette=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:
        im.putpalette(voc_palette())
    im.save(path)


def _save_image(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tiny_images_masks(root, split="train", n=2, size=(40, 48), classes=("bg", "a", "b")):
    rng = np.random.default_rng(0)
    for i in range(n):
        _save_image(root / "images" / split / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        mask = np.zeros(size, np.uint8)
        mask[5:20, 5:20] = 1
        mask[25:, 30:] = 2
        mask[0, :] = 255
        _save_mask(root / "masks" / split / f"{i}.png", mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic_segmentation(tmp_path_factory.mktemp("syn") / "set", n_train=6, n_val=2, imgsz=48,
                                       progress=False)


def test_synthetic_set_is_deterministic_reused_and_voc_style(synthetic_root, tmp_path):
    again = make_synthetic_segmentation(tmp_path / "again", n_train=6, n_val=2, imgsz=48, progress=False)
    for split, n in (("train", 6), ("val", 2)):
        for i in range(n):
            a = synthetic_root / "masks" / split / f"{i:05d}.png"
            assert a.read_bytes() == (again / "masks" / split / f"{i:05d}.png").read_bytes()
            assert (synthetic_root / "images" / split / f"{i:05d}.jpg").read_bytes() == \
                (again / "images" / split / f"{i:05d}.jpg").read_bytes()
    mtime = (synthetic_root / "manifest.json").stat().st_mtime_ns
    assert make_synthetic_segmentation(synthetic_root, n_train=6, n_val=2, imgsz=48, progress=False) == synthetic_root
    assert (synthetic_root / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    with Image.open(synthetic_root / "masks" / "train" / "00000.png") as im:
        assert im.mode == "P"  # palette PNG like VOC's SegmentationClass
    values = np.unique(np.concatenate([read_mask(p).ravel() for p in (synthetic_root / "masks" / "train").glob("*.png")]))
    assert 255 in values and 0 in values and len(set(values) - {0, 255}) >= 3
    assert set(values) <= set(range(len(CLASSES))) | {255}


def test_dataset_items_and_eval_items(synthetic_root):
    ds = open_segmentation_data(synthetic_root, "train", imgsz=64, train=True)
    assert ds.class_names == list(CLASSES)
    ds.check(progress=False)
    x, y = ds[0]
    assert tuple(x.shape) == (3, 64, 64) and tuple(y.shape) == (64, 64)
    assert x.dtype.is_floating_point and y.dtype.is_signed
    assert set(np.unique(y.numpy())) <= set(range(len(CLASSES))) | {255}
    inp, mask = ds.eval_item(1)
    h, w = read_mask(ds.pairs[1][1]).shape
    assert inp.shape == (3, 64, 64) and mask.shape == (h, w)  # mask stays at the original resolution


def test_augmentation_keeps_image_and_mask_aligned():
    # each class is painted in its own flat colour: after scale/crop/flip every interior pixel's colour must
    # still be its class's colour
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    mask = np.zeros((60, 80), np.int64)
    mask[10:30, 5:35] = 1
    mask[35:55, 40:75] = 2
    mask[5:25, 50:70] = 3
    img = colours[mask]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        out_img, out_mask = train_transform(img, mask, 48, rng, scale_range=(0.5, 2.0), ignore_index=255)
        assert out_img.shape == (48, 48, 3) and out_mask.shape == (48, 48)
        valid = out_mask != 255
        # interior: a 7x7 neighbourhood with one label (bilinear blends colours only near boundaries, up to
        # ~2 px at the largest 2x upscale, and nearest may place a boundary 1 px off)
        r = 3
        pad = np.pad(out_mask, r, constant_values=-1)  # beyond the crop edge: unknown (it may have blended in)
        same = np.ones_like(valid)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                same &= pad[r + dy:r + dy + 48, r + dx:r + dx + 48] == out_mask
        interior = valid & same
        assert interior.sum() > 50
        np.testing.assert_array_equal(out_img[interior], colours[out_mask[interior]])
        # padding (scale < 1) is ignore in the mask, never a class
        assert set(np.unique(out_mask)) <= {0, 1, 2, 3, 255}


def test_voc_layout_with_default_class_names(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i in ("2007_000001", "2007_000002"):
        _save_image(voc / "JPEGImages" / f"{i}.jpg", np.full((30, 40, 3), 128, np.uint8))
        m = np.zeros((30, 40), np.uint8)
        m[5:15, 5:15] = 15  # person
        m[4, :] = 255
        _save_mask(voc / "SegmentationClass" / f"{i}.png", m)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    ds = open_segmentation_data(tmp_path, "val", imgsz=64)
    assert len(ds) == 1 and ds.pairs[0][0].stem == "2007_000002"
    assert ds.class_names == list(VOC_CLASSES) and ds.num_classes == 21
    ds.check(progress=False)
    with pytest.raises(DatasetError, match="train.txt"):
        find_pairs(tmp_path, "train")


def test_grey_and_rgba_images_are_converted(tmp_path):
    _tiny_images_masks(tmp_path, n=2)
    _save_image(tmp_path / "images" / "train" / "0.png", np.full((40, 48), 77, np.uint8))  # L
    _save_image(tmp_path / "images" / "train" / "1.png", np.full((40, 48, 4), 200, np.uint8))  # RGBA
    ds = open_segmentation_data(tmp_path, "train", imgsz=32)
    for i in range(2):
        img, mask = ds.load(i)
        assert img.shape == (40, 48, 3) and mask.shape == (40, 48)
    assert ds.load(0)[0][0, 0].tolist() == [77, 77, 77]


def test_size_mismatch_names_the_files(tmp_path):
    _tiny_images_masks(tmp_path, n=2)
    _save_mask(tmp_path / "masks" / "train" / "1.png", np.zeros((20, 24), np.uint8))
    ds = open_segmentation_data(tmp_path, "train", imgsz=32)
    with pytest.raises(DatasetError, match=r"masks/train/1\.png is 24x20.*images/train/1\.png is 48x40"):
        ds.check(progress=False)
    with pytest.raises(DatasetError, match="1.png"):
        ds[1]


def test_out_of_range_mask_values_are_reported(tmp_path):
    _tiny_images_masks(tmp_path, n=1)
    bad = np.zeros((40, 48), np.uint8)
    bad[:3, :3] = 7
    bad[10, 10] = 254
    _save_mask(tmp_path / "masks" / "train" / "0.png", bad)
    ds = open_segmentation_data(tmp_path, "train", imgsz=32)
    with pytest.raises(DatasetError, match=r"0\.png holds value\(s\) \[7, 254\].*3 classes.*10 pixel"):
        ds.check(progress=False)


def test_missing_mask_rgb_mask_and_class_count_errors(tmp_path):
    _tiny_images_masks(tmp_path, n=2)
    with pytest.raises(DatasetError, match="disagrees with the 3 class names"):
        open_segmentation_data(tmp_path, "train", imgsz=32, num_classes=5)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "masks" / "train" / "0.png")
    with pytest.raises(DatasetError, match="colour image"):
        read_mask(tmp_path / "masks" / "train" / "0.png")
    (tmp_path / "masks" / "train" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask.*1\.png"):
        find_pairs(tmp_path, "train")
    with pytest.raises(DatasetError, match="not a segmentation dataset"):
        find_pairs(tmp_path / "images", "train")
    with pytest.raises(DatasetError, match="no split 'val'"):
        find_pairs(tmp_path, "val")
