"""Structurally broken input fails fast at setup, naming the file and the key."""

from __future__ import annotations

import pytest

from vlp.data.annotations import iter_json_array, load_albef_json
from vlp.data.errors import DataSetupError


@pytest.fixture
def root(tmp_path, make_images, write_json):
    names = make_images(tmp_path / "images", 4)
    write_json(tmp_path / "train.json", [{"image": f"images/{n}", "caption": "a dog"} for n in names])
    return tmp_path


def _setup(build_dm, root, **cfg):
    dm = build_dm(name="json", root=str(root), **cfg)
    dm.setup("fit")
    return dm


def test_missing_annotation_file(build_dm, root):
    with pytest.raises(FileNotFoundError, match=r"data\.train_file: annotation file not found: .*nope\.json"):
        _setup(build_dm, root, train_file="nope.json")


def test_malformed_json_reports_line_and_column(build_dm, root):
    (root / "bad.json").write_text('[\n  {"image": "images/img_0.jpg", "caption": "a dog"},\n  {"image": oops}\n]')
    with pytest.raises(DataSetupError, match=r"data\.train_file: malformed JSON in .*bad\.json at line 3 column 13"):
        _setup(build_dm, root, train_file="bad.json")


def test_missing_comma_between_entries(tmp_path):
    (tmp_path / "a.json").write_text('[{"image": "x", "caption": "y"}\n {"image": "x", "caption": "y"}]')
    with pytest.raises(DataSetupError, match=r"at line 2 column 2: expected ',' or '\]'"):
        list(iter_json_array(str(tmp_path / "a.json"), "data.val_file"))


def test_object_instead_of_list_hints_at_data_name(write_json, tmp_path):
    write_json(tmp_path / "coco.json", {"images": [], "annotations": []})
    with pytest.raises(DataSetupError, match=r"data\.train_file: .*coco\.json must contain a JSON list.*data\.name"):
        load_albef_json(str(tmp_path / "coco.json"), "data.train_file")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"image": "images/img_0.jpg", "caption": "a"}, {"caption": "b"}], r"entry 1 .* 'image'"),
        ([{"image": "images/img_0.jpg", "text": "a"}], r"entry 0 .* no 'caption' key"),
        ([["images/img_0.jpg", "a"]], r"entry 0 .* is a list, expected an object"),
    ],
)
def test_wrong_schema_names_entry_and_key(build_dm, root, write_json, entries, message):
    write_json(root / "schema.json", entries)
    with pytest.raises(DataSetupError, match=r"data\.train_file: " + message):
        _setup(build_dm, root, train_file="schema.json")


def test_coco_and_karpathy_schema_errors(build_dm, root, write_json):
    write_json(root / "coco.json", {"images": [{"id": 1, "file_name": "img_0.jpg"}], "annotations": [
        {"image_id": 2, "caption": "x"}]})  # fmt: skip
    dm = build_dm(name="coco", root=str(root), train_file="coco.json", image_root="images")
    with pytest.raises(DataSetupError, match=r"annotations\[0\] .* unknown image_id 2"):
        dm.setup("fit")

    write_json(root / "k.json", {"images": [{"filename": "img_0.jpg", "split": "test", "sentences": []}]})
    dm = build_dm(name="karpathy", root=str(root), train_file="k.json", image_root="images")
    with pytest.raises(
        DataSetupError, match=r"no image .* has a split in \['restval', 'train'\] \(splits present: \['test'\]\)"
    ):
        dm.setup("fit")


def test_image_root_with_most_images_missing(build_dm, root, write_json):
    entries = [{"image": f"images/img_{i}.jpg", "caption": "a dog"} for i in range(10)]  # only 0-3 exist
    write_json(root / "mostly_missing.json", entries)
    with pytest.raises(DataSetupError, match=r"data\.image_root: 6 of 10 sampled images .* missing"):
        _setup(build_dm, root, train_file="mostly_missing.json")


def test_wrong_image_root_directory(build_dm, root):
    with pytest.raises(DataSetupError, match=r"data\.image_root: image directory not found: .*pictures"):
        _setup(build_dm, root, train_file="train.json", image_root="pictures")


def test_a_few_missing_images_are_tolerated(build_dm, root, write_json):
    entries = [{"image": f"images/img_{i}.jpg", "caption": "a dog"} for i in range(5)]  # img_4 is missing
    write_json(root / "few_missing.json", entries)
    dm = _setup(build_dm, root, train_file="few_missing.json")
    assert dm.train_dataset[4]["skipped"] is True
    assert dm.train_dataset[4]["reason"].startswith("missing file")


def test_eval_missing_images_policy(build_dm, root, write_json):
    entries = [{"image": f"images/img_{i}.jpg", "caption": ["a dog"]} for i in range(5)]  # img_4 is missing
    write_json(root / "val.json", entries)
    dm = build_dm(name="json", root=str(root), val_file="val.json", eval_missing_images="error")
    with pytest.raises(
        DataSetupError, match=r"data\.image_root: 1 evaluation images .* missing.*img_4.*eval_missing_images"
    ):
        dm.setup("validate")

    # "warn": the missing image keeps its gallery slot (blank image), and is reported in the batch.
    dm = build_dm(name="json", root=str(root), val_file="val.json", eval_missing_images="warn")
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["index"]) for b in batches) == 5
    skipped = [s for b in batches for s in b["skipped"]]
    assert [s["index"] for s in skipped] == [4] and skipped[0]["reason"].startswith("missing file")
    assert float(batches[-1]["image"][-1].abs().sum()) == 0.0
