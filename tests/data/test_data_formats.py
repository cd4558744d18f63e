"""Every format loads a small fixture into the same sample schema (and the real Flickr8k files when present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N = 6  # images per fixture
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"


def _caption(i: int) -> str:
    return f"A dog, number {i}!"


def _cleaned(i: int) -> str:
    return f"a dog number {i}"


def _number(caption: str) -> int:
    """The image number a fixture caption names (its first all-digit word)."""
    return int(next(word for word in caption.split() if word.isdigit()))


def _assert_pairs_match(dm, check_train_item, util):
    """Every training item has the schema, and its image is the one its caption names (by colour)."""
    ds = dm.train_dataset
    for i in range(len(ds)):
        item = check_train_item(ds[i])
        assert item["index"] == i
        assert np.abs(util.mean_colour(item["image"]) - util.colour_of(_number(item["caption"]))).max() < 12


def _assert_retrieval(rd, n_images, captions_per_image):
    assert len(rd) == n_images
    assert len(rd.texts) == n_images * captions_per_image
    assert rd.txt2img.dtype == np.int64 and rd.txt2img.shape == (n_images * captions_per_image,)
    for image, texts in enumerate(rd.img2txt):
        assert list(rd.txt2img[texts]) == [image] * captions_per_image
    item = rd[n_images - 1]
    assert set(item) == {"image", "index", "image_id"} and item["index"] == n_images - 1
    assert rd.load_image_pil(0).mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------
# ALBEF/BLIP JSON


@pytest.fixture
def albef_root(tmp_path, make_images, write_json):
    names = make_images(tmp_path / "images", N)
    train = [{"image": f"images/{n}", "caption": _caption(i), "image_id": f"id{i}"} for i, n in enumerate(names)]
    train.append({"image": "images/img_0.jpg", "caption": "A dog, number 0 again.", "image_id": "id0"})
    val = [{"image": f"images/{n}", "caption": [_caption(i), f"Number {i} dog."]} for i, n in enumerate(names)]
    write_json(tmp_path / "ann" / "train.json", train)
    write_json(tmp_path / "ann" / "val.json", val)
    return tmp_path


def test_albef_json_train_and_eval(albef_root, build_dm, check_train_item, util):
    dm = build_dm(name="json", root=str(albef_root), train_file="ann/train.json", val_file="ann/val.json")
    dm.setup("fit")
    assert len(dm.train_dataset) == N + 1
    _assert_pairs_match(dm, check_train_item, util)
    # Two entries of the same image share its image_id.
    assert dm.train_dataset[0]["image_id"] == dm.train_dataset[N]["image_id"]
    assert dm.train_dataset[N]["caption"] == "a dog number 0 again"

    rd = dm.val_dataset
    _assert_retrieval(rd, N, 2)
    assert rd.texts[:2] == ["a dog number 0", "number 0 dog"]
    assert rd.image_paths[0].endswith("images/img_0.jpg")


def test_caption_list_draws_one_per_epoch(albef_root, build_dm):
    dm = build_dm(name="json", root=str(albef_root), train_file="ann/val.json")
    dm.setup("fit")
    ds = dm.train_dataset
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        seen.add(ds[2]["caption"])
        assert ds[2]["caption"] == ds[2]["caption"]  # deterministic within an epoch
    assert seen == {"a dog number 2", "number 2 dog"}


# ---------------------------------------------------------------------------------------------------------------
# Official COCO and Karpathy


@pytest.fixture
def coco_root(tmp_path, make_images, write_json):
    names = make_images(tmp_path / "train2017", N, prefix="")
    images = [{"id": 1000 + i, "file_name": n, "width": 40, "height": 32} for i, n in enumerate(names)]
    anns = [{"id": k, "image_id": 1000 + i, "caption": c} for k, (i, c) in enumerate(
        (i, c) for i in range(N) for c in (_caption(i), f"Number {i} dog.", f"Dog {i}."))]  # fmt: skip
    write_json(tmp_path / "annotations" / "captions_train2017.json", {"images": images, "annotations": anns})
    return tmp_path


def test_coco_official_per_caption_and_eval(coco_root, build_dm, check_train_item, util):
    common = {"name": "coco", "root": str(coco_root), "image_root": "train2017"}
    dm = build_dm(
        **common, train_file="annotations/captions_train2017.json", val_file="annotations/captions_train2017.json"
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 * N
    _assert_pairs_match(dm, check_train_item, util)
    _assert_retrieval(dm.val_dataset, N, 3)


def test_coco_official_per_image_unit(coco_root, build_dm):
    dm = build_dm(
        name="coco", root=str(coco_root), image_root="train2017", train_unit="image",
        train_file="annotations/captions_train2017.json",
    )  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_dataset) == N
    assert dm.train_dataset[4]["caption"] in {"a dog number 4", "number 4 dog", "dog 4"}


@pytest.mark.parametrize("style", ["coco", "flickr"])
def test_karpathy_splits(tmp_path, make_images, write_json, build_dm, check_train_item, util, style):
    folder = "val2014" if style == "coco" else "flickr30k-images"
    names = make_images(tmp_path / folder, N)
    splits = ["train", "restval", "val", "val", "test", "test"]
    images = []
    for i, (name, split) in enumerate(zip(names, splits)):
        entry = {"filename": name, "split": split, "imgid": i, "sentences": [
            {"raw": _caption(i), "tokens": ["a", "dog"]}, {"tokens": ["number", str(i), "dog"]}]}  # fmt: skip
        if style == "coco":
            entry.update(filepath=folder, cocoid=500 + i)
        images.append(entry)
    write_json(tmp_path / f"dataset_{style}.json", {"images": images, "dataset": style})

    image_root = "." if style == "coco" else folder
    dm = build_dm(name="karpathy", root=str(tmp_path), train_file=f"dataset_{style}.json", image_root=image_root)
    dm.setup()
    # train + restval images, two sentences each (the second from its tokens).
    assert len(dm.train_dataset) == 4
    _assert_pairs_match(dm, check_train_item, util)
    _assert_retrieval(dm.val_dataset, 2, 2)
    _assert_retrieval(dm.test_dataset, 2, 2)
    assert dm.test_dataset.texts == ["a dog number 4", "number 4 dog", "a dog number 5", "number 5 dog"]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_table(util, n: int = N, with_bytes: bool = True):
    import pyarrow as pa

    images = [{"bytes": util.jpeg_bytes(util.colour_of(i)), "path": None} for i in range(n)]
    return pa.table({
        "picture": images if with_bytes else [f"img_{i}.jpg" for i in range(n)],
        "text": [[_caption(i), f"Number {i} dog."] for i in range(n)],
        "photo_id": [f"p{i}" for i in range(n)],
    })  # fmt: skip


HF_COLUMNS = {"image_column": "picture", "caption_column": "text", "image_id_column": "photo_id"}


def _hf_dm(build_dm, tmp_path, train_file, **extra):
    return build_dm(
        name="hf", root=str(tmp_path), train_file=train_file, hf_cache_dir=str(tmp_path / "cache"), **HF_COLUMNS,
        **extra,
    )  # fmt: skip


def test_hf_parquet_with_image_bytes(tmp_path, util, build_dm, check_train_item):
    import pyarrow.parquet as pq

    pq.write_table(_hf_table(util), tmp_path / "train.parquet")
    dm = _hf_dm(build_dm, tmp_path, "train.parquet", val_file="train.parquet")
    dm.setup()
    assert len(dm.train_dataset) == N
    _assert_pairs_match(dm, check_train_item, util)
    assert [dm.train_dataset[i]["image_id"] for i in range(N)] == list(range(N))
    _assert_retrieval(dm.val_dataset, N, 2)


def test_hf_parquet_with_path_column(tmp_path, util, build_dm, make_images, check_train_item):
    import pyarrow.parquet as pq

    make_images(tmp_path / "pics", N)
    pq.write_table(_hf_table(util, with_bytes=False), tmp_path / "train.parquet")
    dm = _hf_dm(build_dm, tmp_path, "train.parquet", image_root="pics")
    dm.setup("fit")
    _assert_pairs_match(dm, check_train_item, util)


def test_hf_arrow_save_to_disk(tmp_path, util, build_dm, check_train_item):
    import datasets

    datasets.Dataset(_hf_table(util)).save_to_disk(str(tmp_path / "saved"))
    dm = _hf_dm(build_dm, tmp_path, "saved")
    dm.setup("fit")
    assert len(dm.train_dataset) == N
    check_train_item(dm.train_dataset[3])


def test_hf_arrow_file_builder(tmp_path, util, build_dm, check_train_item):
    import datasets

    datasets.Dataset(_hf_table(util)).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow")).name
    dm = _hf_dm(build_dm, tmp_path, f"saved/{arrow}")
    dm.setup("fit")
    _assert_pairs_match(dm, check_train_item, util)


def test_hf_imagefolder_with_metadata(tmp_path, make_images, build_dm, check_train_item, util):
    names = make_images(tmp_path / "folder" / "train", N)
    with open(tmp_path / "folder" / "train" / "metadata.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"file_name": name, "caption": _caption(i)}) + "\n")
    dm = build_dm(
        name="hf", root=str(tmp_path), train_file="folder", val_file="folder", hf_cache_dir=str(tmp_path / "c")
    )
    dm.setup()
    _assert_pairs_match(dm, check_train_item, util)
    _assert_retrieval(dm.val_dataset, N, 1)


def test_hf_streaming_parquet(tmp_path, util, build_dm, check_train_item):
    import pyarrow.parquet as pq

    pq.write_table(_hf_table(util), tmp_path / "train.parquet")
    dm = _hf_dm(build_dm, tmp_path, "train.parquet", streaming=True, shuffle_buffer=3)
    dm.setup("fit")
    items = list(dm.train_dataset)
    assert len(items) == N
    for item in items:
        check_train_item(item)
        assert np.abs(util.mean_colour(item["image"]) - util.colour_of(_number(item["caption"]))).max() < 12
    assert len({item["image_id"] for item in items}) == N


def test_hf_missing_column_names_the_key(tmp_path, util, build_dm):
    import pyarrow.parquet as pq

    from vlp.data.errors import DataSetupError

    pq.write_table(_hf_table(util), tmp_path / "train.parquet")
    dm = _hf_dm(build_dm, tmp_path, "train.parquet")
    dm.cfg.caption_column = "captions"
    with pytest.raises(DataSetupError, match=r"data\.caption_column.*'captions'"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# webdataset shards


def test_webdataset_shards(tmp_path, make_shards, build_dm, check_train_item, util):
    captions = make_shards(tmp_path / "shards", n_shards=3, per_shard=4)
    dm = build_dm(name="webdataset", root=str(tmp_path), shards="shards/{00000..00002}.tar", shuffle_buffer=4)
    dm.setup("fit")
    items = list(dm.train_dataset)
    assert sorted(item["caption"] for item in items) == sorted(c.lower() for c in captions)
    for item in items:
        check_train_item(item)
        s, j = map(int, item["caption"].split()[-2:])
        assert item["image_id"] == s * 10000 + j  # from the img2dataset key
        assert np.abs(util.mean_colour(item["image"]) - util.colour_of(s * 4 + j)).max() < 12


def test_webdataset_resampled_epoch_size(tmp_path, make_shards, build_dm):
    make_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    dm = build_dm(
        name="webdataset", root=str(tmp_path), shards="shards/{00000..00001}.tar", resampled=True, epoch_size=10
    )
    dm.setup("fit")
    first = [item["caption"] for item in dm.train_dataset]
    assert len(first) == 10  # resampling never runs dry; epoch_size ends the epoch
    dm.set_epoch(1)
    assert [item["caption"] for item in dm.train_dataset] != first


def test_webdataset_missing_shard_names_the_key(tmp_path, make_shards, build_dm):
    make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    dm = build_dm(name="webdataset", root=str(tmp_path), shards="shards/{00000..00003}.tar")
    with pytest.raises(FileNotFoundError, match=r"data\.shards: 3 of 4"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic and real data


def test_synthetic_default(build_dm, check_train_item):
    dm = build_dm(synthetic_train_size=10, synthetic_eval_size=4, synthetic_captions_per_image=3)
    dm.setup()
    assert len(dm.train_dataset) == 10
    item = check_train_item(dm.train_dataset[7])
    assert item["image_id"] == 7
    assert item["caption"] in dm.train_dataset.source.captions(7)
    _assert_retrieval(dm.val_dataset, 4, 3)
    assert dm.val_dataset.image_paths is None
    assert dm.val_dataset.texts != dm.test_dataset.texts


@pytest.mark.real_data
def test_real_flickr8k_mini(flickr8k, build_dm, check_train_item):
    from omegaconf import OmegaConf

    from vlp.data import DataConfig
    from vlp.data.captions import clean_caption

    # The shipped config, composed with paths.data_root as the lead will do.
    root = OmegaConf.create({"paths": {"data_root": str(flickr8k.parent)}})
    root.data = OmegaConf.load(CONFIG_DIR / "flickr8k_mini.yaml")
    cfg = DataConfig.from_mapping(root.data)
    dm = build_dm(**{**vars(cfg), "image_size": 32, "num_workers": 0, "randaugment": False})
    dm.setup()

    # Training pairs: entry 0 of the file, image ids shared by captions of the same photo.
    raw = json.loads((flickr8k / "ann" / "flickr8k_mini_train.json").read_text())
    assert len(dm.train_dataset) == len(raw) == 2500
    item = check_train_item(dm.train_dataset[0])
    assert item["caption"] == clean_caption(raw[0]["caption"], "albef", 30)
    same_photo = raw[0]["image"] == raw[1]["image"]
    assert (dm.train_dataset[1]["image_id"] == item["image_id"]) == same_photo

    # Retrieval: 100 test images with 5 captions each.
    rd = dm.test_dataset
    _assert_retrieval(rd, 100, 5)
    assert Image.open(rd.image_paths[0]).size == rd.load_image_pil(0).size


def test_webdataset_ranks_and_workers_cover_each_sample_once(tmp_path, make_shards, build_dm):
    captions = make_shards(tmp_path / "shards", n_shards=4, per_shard=3)
    seen = []
    for rank in range(2):
        dm = build_dm(name="webdataset", root=str(tmp_path), shards="shards/{00000..00003}.tar", num_workers=2)
        dm._rank, dm._world = rank, 2
        dm.setup("fit")
        seen.append([int(i) for b in dm.train_dataloader() for i in b["image_id"].tolist()])
    assert len(seen[0]) == len(seen[1]) == 6
    assert sorted(seen[0] + seen[1]) == sorted(s * 10000 + j for s in range(4) for j in range(3))
    assert len(captions) == 12


def test_hf_streaming_with_workers_and_ranks(tmp_path, util, build_dm):
    import pyarrow.parquet as pq

    # Four files = four stream shards: each rank gets two, one per DataLoader worker.
    n = 8
    table = _hf_table(util, n)
    for k in range(4):
        pq.write_table(table.slice(2 * k, 2), tmp_path / f"part{k}.parquet")
    seen = []
    for rank in range(2):
        # (Unshuffled: datasets sleeps 5 s when a shuffled parquet stream shuts down, per worker.)
        dm = _hf_dm(build_dm, tmp_path, "part*.parquet", streaming=True, num_workers=2, shuffle_buffer=0)
        dm._rank, dm._world = rank, 2
        dm.setup("fit")
        seen.append([_image_number(util, image, n) for b in dm.train_dataloader() for image in b["image"]])
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == list(range(n))


def _image_number(util, image, n: int) -> int:
    """Which fixture image a tensor shows (nearest fixture colour)."""
    distances = [np.abs(util.mean_colour(image) - util.colour_of(i)).max() for i in range(n)]
    assert min(distances) < 12
    return int(np.argmin(distances))
