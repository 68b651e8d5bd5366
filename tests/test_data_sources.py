"""Data sources: bundled digits, image folders (labels, captions, bad files), TFDS array_record."""
import io
import logging
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from ldm_jax.data import sources


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_image(path, value: int, size=(6, 5), fmt=None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, format=fmt)


def test_digits_fixed_disjoint_splits():
    train, test = sources.DigitsSource("train"), sources.DigitsSource("test")
    assert (len(train), len(test)) == (1497, 300)
    example = train[0]
    assert example["image"].shape == (8, 8, 3) and example["image"].dtype == np.uint8
    # Grey in RGB, 0..16 scaled to the full 0..255 range.
    train_images = np.stack([train[i]["image"] for i in range(len(train))])
    assert np.array_equal(train_images[..., 0], train_images[..., 2])
    assert train_images.min() == 0 and train_images.max() == 255
    test_images = {test[i]["image"].tobytes() for i in range(len(test))}
    assert not test_images & {im.tobytes() for im in train_images}
    assert sorted({train[i]["label"] for i in range(len(train))}) == list(range(10))
    assert train.class_names[3] == "3"
    # Fixed: a second load gives the same split.
    assert np.array_equal(sources.DigitsSource("test")[7]["image"], test[7]["image"])
    with pytest.raises(ValueError, match="'val'"):
        sources.DigitsSource("val")


def test_image_folder_class_labels_are_sorted_names(tmp_path):
    # Created out of order, one class with a nested folder; labels follow the sorted names.
    values = {"zebra": 30, "ant": 10, "mole": 20}
    for name, value in values.items():
        _write_image(str(tmp_path / name / "x.png"), value)
    _write_image(str(tmp_path / "mole" / "deeper" / "y.jpg"), 20, fmt="JPEG")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    source = sources.ImageFolderSource(str(tmp_path))
    assert source.class_names == ("ant", "mole", "zebra")
    assert len(source) == 4 and source.skipped == []
    for i in range(len(source)):
        element = source[i]
        image = np.asarray(element["image"])
        assert image.shape == (6, 5, 3)
        class_name = source.class_names[element["label"]]
        np.testing.assert_allclose(image.mean(), values[class_name], atol=2)


def test_image_folder_flat_with_captions(tmp_path):
    for i, caption in enumerate(["a red cube", "two cats\n"]):
        _write_image(str(tmp_path / f"img{i}.png"), 50 * i)
        (tmp_path / f"img{i}.txt").write_text(caption, encoding="utf-8")
    source = sources.ImageFolderSource(str(tmp_path))
    assert source.class_names is None
    assert [source[i]["caption"] for i in range(2)] == ["a red cube", "two cats"]
    assert "label" not in source[0]


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "not an existing folder"),
        ("empty", "holds no images"),
        ("mixed", "mixes class sub-folders"),
        ("no_caption", "no caption .txt"),
        ("empty_class", "class folder"),
    ],
)
def test_image_folder_bad_layouts_raise_naming_the_path(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "mixed":
        _write_image(str(root / "cls" / "a.png"), 1)
        _write_image(str(root / "loose.png"), 1)
    if layout == "no_caption":
        _write_image(str(root / "a.png"), 1)
    if layout == "empty_class":
        _write_image(str(root / "cls" / "a.png"), 1)
        (root / "other").mkdir()
    with pytest.raises(ValueError, match=message) as err:
        sources.ImageFolderSource(str(root))
    assert str(root) in str(err.value)


def _folder_with_bad_files(root) -> list[str]:
    for i in range(3):
        _write_image(str(root / "cls" / f"good{i}.jpg"), 40 * i, size=(32, 32), fmt="JPEG")
    garbage = root / "cls" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = root / "cls" / "truncated.jpg"
    full = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(full, format="JPEG")
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    return [str(garbage), str(truncated)]


def test_unreadable_images_are_skipped_counted_and_named_once(tmp_path, caplog):
    bad = _folder_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        source = sources.ImageFolderSource(str(tmp_path))
    assert len(source) == 3
    assert sorted(source.skipped) == sorted(bad)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(path in warnings[0] for path in bad)
    assert all(np.asarray(source[i]["image"]).shape == (32, 32, 3) for i in range(3))


def test_unreadable_images_raise_in_strict_mode(tmp_path):
    bad = _folder_with_bad_files(tmp_path)
    with pytest.raises(ValueError, match="2 unreadable") as err:
        sources.ImageFolderSource(str(tmp_path), strict=True)
    assert all(path in str(err.value) for path in bad)


def test_unchecked_unreadable_image_raises_naming_it_when_read(tmp_path):
    bad = _folder_with_bad_files(tmp_path)
    source = sources.ImageFolderSource(str(tmp_path), check_images=False)
    assert len(source) == 5
    index = source.files.index(bad[0])
    with pytest.raises(ValueError, match="garbage.png"):
        source[index]


# --- Images wider than 8 bits: scaled by their mode's range (transforms.to_8bit), never clipped. ---

GRADIENT = np.arange(4 * 6).reshape(4, 6) / 23.0  # [4, 6] in [0, 1]
# name -> (array written with PIL, its full-scale value)
WIDE_IMAGES = {
    "grey16.png": (np.round(GRADIENT * 65535).astype(np.uint16), 65535),  # opens as "I;16"
    "int32.tif": (np.round(GRADIENT * 65535).astype(np.int32), 65535),  # opens as "I"
    "float.tif": (GRADIENT.astype(np.float32), 1.0),  # opens as "F"
}


def test_16_bit_int32_and_float_images_are_scaled_by_their_range(tmp_path):
    (tmp_path / "cls").mkdir()
    for name, (array, _) in WIDE_IMAGES.items():
        Image.fromarray(array).save(tmp_path / "cls" / name)
    source = sources.ImageFolderSource(str(tmp_path), strict=True)
    assert len(source) == 3
    for i, path in enumerate(source.files):  # PIL's convert gave all-255 (16-bit, int32) and all-0 (float)
        array, full_scale = WIDE_IMAGES[os.path.basename(path)]
        expected = np.round(array.astype(np.float64) * 255 / full_scale).astype(np.uint8)  # 0..255
        np.testing.assert_array_equal(np.asarray(source[i]["image"]), np.repeat(expected[..., None], 3, -1), path)


@pytest.mark.parametrize("name, array, mode, values", [
    ("float255.tif", GRADIENT.astype(np.float32) * 255, "'F'", "[0.0, 255.0]"),
    ("int32.tif", (GRADIENT * 2**20).astype(np.int32), "'I'", "[0, 1048576]"),
], ids=["float_beyond_1", "int32_beyond_16_bit"])
def test_images_outside_their_modes_range_are_refused_naming_file_and_mode(tmp_path, name, array, mode, values):
    _write_image(str(tmp_path / "cls" / "fine.png"), 10)
    path = str(tmp_path / "cls" / name)
    Image.fromarray(array).save(path)
    message = re.escape(f"{path}: PIL mode {mode} holds values in {values}")
    with pytest.raises(ValueError, match=message):
        sources.ImageFolderSource(str(tmp_path), strict=True)
    assert sources.ImageFolderSource(str(tmp_path)).skipped == [path]
    unchecked = sources.ImageFolderSource(str(tmp_path), check_images=False)
    with pytest.raises(ValueError, match=message):
        unchecked[unchecked.files.index(path)]


# --- TFDS: a tiny dataset of our own, prepared in array_record format and read back. ----------

TFDS_IMAGES = {i: np.random.default_rng(i).integers(0, 255, (4 + i, 7, 3), np.uint8) for i in range(7)}


class LdmJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """7 train + 3 test random images of distinct heights, 3 classes; PNG-encoded (no tensorflow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "kind": tfds.features.ClassLabel(names=["x", "y", "z"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(range(7)), "test": self._generate_examples(range(3))}

    def _generate_examples(self, keys):
        for key in keys:
            yield key, {"picture": _png_bytes(TFDS_IMAGES[key]), "kind": key % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    LdmJaxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_array_record_round_trip(tfds_dir):
    source = sources.TfdsSource(
        "ldm_jax_tiny_images", "train", tfds_dir, image_key="picture", label_key="kind"
    )
    assert len(source) == 7 and source.class_names == ("x", "y", "z")
    seen = set()
    for i in range(len(source)):
        element = source[i]
        key = element["image"].shape[0] - 4  # heights are distinct: they identify the example
        np.testing.assert_array_equal(element["image"], TFDS_IMAGES[key])
        assert element["label"] == key % 3
        seen.add(key)
    assert seen == set(range(7))


@pytest.mark.parametrize(
    "name, split, message",
    [
        ("ldm_jax_no_such_set", "train", "'ldm_jax_no_such_set' is not a known TFDS dataset"),
        ("ldm_jax_tiny_images", "validation", "data.split='validation'"),
        ("mnist", "train", "'mnist' is not prepared"),
    ],
)
def test_tfds_bad_name_or_split_raise_naming_it(tfds_dir, name, split, message):
    with pytest.raises(ValueError, match=message):
        sources.TfdsSource(name, split, tfds_dir, image_key="picture", label_key="kind")


def test_tfds_unknown_feature_raises(tfds_dir):
    with pytest.raises(ValueError, match="no feature 'image'"):
        sources.TfdsSource("ldm_jax_tiny_images", "train", tfds_dir)
