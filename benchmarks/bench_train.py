"""Training-step and ITM-scoring throughput of vlp against open_clip's CLIP and Hugging Face BLIP at equal sizes.

Sizes (every system): ViT width 192, depth 4, 3 heads, patch 16, 224 px; text width 192, 4 layers, 3 heads,
MLP 768, 32 tokens; 4 fusion blocks; embedding 256; batch 32; all dropout off; AdamW over every trainable
parameter. vlp follows ALBEF's split: a random 8-layer BERT whose lower 4 layers are the text tower and whose
top 4 initialise the fusion blocks (the same FLOPs as text 4 + fusion 4). BLIP's text encoder has
cross-attention in every layer: a 4-layer BLIP text encoder run once in text mode (ITC) and once with image
cross-attention (ITM) does the FLOPs of vlp's 4 text layers plus 4 fusion blocks.

Each system lives in its own process, so that its peak RSS and FLOP count are its own. The parent drives them
in rounds, one step per system per round in a rotating order, so that drift of a shared machine touches every
system alike; ratios are medians of the per-round ratios.

Systems:
  vlp_a         ITC only (no momentum, no queue, no ITM)
  vlp_b         ITC + ITM with hard negatives
  vlp_c         vlp_b + momentum encoders, a full 65536 queue and distillation
  open_clip     open_clip.model.CLIP + open_clip.loss.ClipLoss                                   (peer of vlp_a)
  blip_forward  BlipForImageTextRetrieval through forward(): use_itm_head=False for ITC, then True for
                the positives and hard negatives (the vision tower re-runs on every ITM pair)    (peer of vlp_b)
  blip_reuse    the same model through its submodules: one vision pass reused for ITM            (peer of vlp_b)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH, IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP, TEXT_LEN, EMBED = 32, 224, 16, 192, 4, 3, 768, 32, 256
QUEUE = 65536
TRAIN_SYSTEMS = ("vlp_a", "vlp_b", "vlp_c", "open_clip", "blip_forward", "blip_reuse")
COMPARISONS = (  # (ours, peer, target ratio of pairs/s)
    ("vlp_a", "open_clip", 1.0),
    ("vlp_b", "blip_forward", 1.3),
    ("vlp_b", "blip_reuse", 1.3),
)
DDP_CHOICES = ("auto", "on", "off")
ITM_IMAGES, ITM_CAPTIONS = 4, 32  # one ITM call scores every caption against every image: 128 pairs


# ----- synthetic batch ---------------------------------------------------------------------------------------


def make_batch(vocab_size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and captions of 12..32 tokens ([CLS] words [SEP] then padding), one image id per pair."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, TEXT_LEN + 1, (BATCH,), generator=gen)
    input_ids = torch.randint(5, vocab_size, (BATCH, TEXT_LEN), generator=gen)
    positions = torch.arange(TEXT_LEN)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    input_ids[:, 0] = 2  # [CLS] of vlp's built-in vocabulary
    input_ids[torch.arange(BATCH), lengths - 1] = 3  # [SEP]
    input_ids = input_ids * attention_mask  # [PAD] = 0
    batch = {
        "image": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_id": torch.arange(BATCH),
    }
    return {key: value.to(device) for key, value in batch.items()}


def vocab_size() -> int:
    from vlp.model.tokenizer import builtin_tokenizer

    return len(builtin_tokenizer())


# ----- systems -----------------------------------------------------------------------------------------------


@dataclass
class System:
    """A model, its optimizer, one training step, and (for ITM peers) named scoring functions."""

    name: str
    model: torch.nn.Module
    step: Any  # () -> None: forward, backward, optimizer step
    info: dict[str, Any] = field(default_factory=dict)
    itm: dict[str, Any] = field(default_factory=dict)  # mode -> () -> None, scoring ITM_IMAGES x ITM_CAPTIONS


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4, weight_decay=0.02)


class LossModule(torch.nn.Module):
    """A system's trainable modules and its loss as one forward(), so that DDP sees one forward per backward."""

    def __init__(self, loss_fn, *modules: torch.nn.Module, params: tuple[torch.nn.Parameter, ...] = ()):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self.extra = torch.nn.ParameterList(params)  # e.g. a learnable temperature kept outside the model
        self.loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn()


def training_step(loss_module: LossModule, device: torch.device, ddp: bool, after_step=None):
    """() -> None: forward under autocast, backward, AdamW step; through DistributedDataParallel when ``ddp``."""
    optimizer = adamw(loss_module.parameters())
    runner = wrap_ddp(loss_module, device) if ddp else loss_module

    def step():
        with common.autocast(device):
            loss = runner()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    return step


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The DDP strategy on one device, as configs/trainer/ddp.yaml sets it (a process group of one per worker).

    The rendezvous is a file, so no port is opened for it: NCCL on CUDA, gloo on CPU.
    """
    import tempfile

    from torch.nn.parallel import DistributedDataParallel

    if not torch.distributed.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="vlp_bench_ddp_", delete=False).name
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    device_ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)


def vlp_config(mode: str):
    """The ALBEF split at the benchmark sizes; ``mode`` a, b or c selects the losses."""
    from vlp.model import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig

    bert = dict(hidden_size=WIDTH, num_hidden_layers=2 * DEPTH, num_attention_heads=HEADS, intermediate_size=MLP)
    bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    full = mode == "c"
    return ModelConfig(
        image_encoder=ImageEncoderConfig(name="vit_tiny_patch16_224", image_size=IMAGE, timm_kwargs=dict(depth=DEPTH)),
        text_encoder=TextEncoderConfig(config=bert, num_layers=DEPTH, max_length=TEXT_LEN),
        fusion=FusionConfig(num_layers=DEPTH),
        embed_dim=EMBED,
        itm=mode != "a",
        momentum=full,
        queue_size=QUEUE if full else 0,
        distill=full,
    )


def fill_queue(model) -> None:
    """Steady state of a long run: every queue slot holds a unit feature with an id no batch uses."""
    queue = model.queue
    feats = F.normalize(torch.randn(2, queue.size, queue.image_queue.shape[1], device=queue.image_queue.device), dim=-1)
    ids = torch.arange(queue.size, device=queue.id_queue.device) + 10**9
    queue.enqueue(feats[0], feats[1], ids)


def build_vlp(mode: str, device: torch.device, ddp: bool) -> System:
    from vlp.model import VLPModel

    model = VLPModel(vlp_config(mode)).to(device).train()
    if model.queue is not None:
        fill_queue(model)
    batch = make_batch(len(model.tokenizer), device)
    loss_module = LossModule(lambda: model(batch)["loss"], model)
    step = training_step(loss_module, device, ddp, after_step=model.after_optimizer_step)

    system = System(f"vlp_{mode}", model, step, info=vlp_info(model))
    if mode == "b":
        system.itm["vlp_cached_kv"] = vlp_itm_scorer(model, batch, device)
    return system


def vlp_info(model) -> dict[str, Any]:
    text_cfg = model.text_encoder.model.config
    return {
        "text_attention": getattr(text_cfg, "_attn_implementation", None),
        "image_attention": "timm fused_attn (F.scaled_dot_product_attention)"
        if getattr(model.visual_encoder.model.blocks[0].attn, "fused_attn", False)
        else "timm eager",
        "fusion_attention": "F.scaled_dot_product_attention",
    }


def build_open_clip(device: torch.device, ddp: bool) -> System:
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE)
    text = CLIPTextCfg(context_length=TEXT_LEN, vocab_size=vocab_size(), width=WIDTH, heads=HEADS, layers=DEPTH)
    vision.mlp_ratio = text.mlp_ratio = MLP / WIDTH
    model = CLIP(EMBED, vision_cfg=vision, text_cfg=text).to(device).train()
    clip_loss, batch = ClipLoss(), make_batch(vocab_size(), device)

    def loss_fn():
        image_features, text_features, logit_scale = model(batch["image"], batch["input_ids"])
        return clip_loss(image_features, text_features, logit_scale)

    step = training_step(LossModule(loss_fn, model), device, ddp)
    return System("open_clip", model, step, info={"attention": "torch.nn.MultiheadAttention"})


# ----- BLIP peers --------------------------------------------------------------------------------------------


def blip_config():
    from transformers import BlipConfig

    text = dict(vocab_size=vocab_size(), hidden_size=WIDTH, encoder_hidden_size=WIDTH, intermediate_size=MLP)
    text.update(num_hidden_layers=DEPTH, num_attention_heads=HEADS, bos_token_id=2, sep_token_id=3, eos_token_id=3)
    text.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS)
    vision.update(image_size=IMAGE, patch_size=PATCH)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=EMBED)


@torch.no_grad()
def user_hard_negatives(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What users write: softmax of the similarities without the positives, one torch.multinomial per row."""
    logits = sim.detach().float().clone()
    logits.fill_diagonal_(float("-inf"))  # every pair is its own image here
    weights_i2t, weights_t2i = logits.softmax(dim=1), logits.t().softmax(dim=1)
    neg_text = [torch.multinomial(weights_i2t[row], 1).item() for row in range(sim.shape[0])]
    neg_image = [torch.multinomial(weights_t2i[row], 1).item() for row in range(sim.shape[0])]
    return torch.tensor(neg_text, device=sim.device), torch.tensor(neg_image, device=sim.device)


def itc_from_sim(sim: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim.float(), labels) + F.cross_entropy(sim.float().t(), labels)) / 2


def itm_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1  # positives, then (image, hard text) and (hard image, text)
    return labels


def build_blip(reuse: bool, device: torch.device, ddp: bool) -> System:
    from transformers import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval(blip_config()).to(device).train()
    temp = torch.nn.Parameter(torch.tensor(0.07, device=device))  # the learnable temperature users add
    batch = make_batch(vocab_size(), device)
    blip_loss = blip_reuse_loss if reuse else blip_forward_loss

    def loss_fn():
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)
        return blip_loss(model, batch, temp)

    step = training_step(LossModule(loss_fn, model, params=(temp,)), device, ddp)

    info = {"text_attention": "BlipTextSelfAttention (eager matmul + softmax)", "vision_attention": "eager"}
    system = System("blip_reuse" if reuse else "blip_forward", model, step, info=info)
    if reuse:
        system.itm = blip_itm_scorers(model, batch, device)
    return system


def blip_forward_loss(model, batch, temp) -> torch.Tensor:
    """ITC from ``use_itm_head=False``, ITM from ``use_itm_head=True`` over positives and hard negatives."""
    ids, mask, image = batch["input_ids"], batch["attention_mask"], batch["image"]
    sim = model(input_ids=ids, pixel_values=image, attention_mask=mask, use_itm_head=False).itm_score / temp
    neg_text, neg_image = user_hard_negatives(sim)
    itm_ids, itm_mask = torch.cat([ids, ids[neg_text], ids]), torch.cat([mask, mask[neg_text], mask])
    itm_image = torch.cat([image, image, image[neg_image]])
    logits = model(input_ids=itm_ids, pixel_values=itm_image, attention_mask=itm_mask, use_itm_head=True).itm_score
    return itc_from_sim(sim) + F.cross_entropy(logits.float(), itm_labels(ids.shape[0], ids.device))


def blip_reuse_loss(model, batch, temp) -> torch.Tensor:
    """The same losses with one vision pass: the submodules that forward() calls, called directly."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_embeds = model.vision_model(pixel_values=batch["image"]).last_hidden_state  # (B, N, C)
    text_embeds = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    sim = image_feat @ text_feat.t() / temp

    # ITM: the text encoder again, now cross-attending to the image tokens of each pair.
    neg_text, neg_image = user_hard_negatives(sim)
    itm_ids, itm_mask = torch.cat([ids, ids[neg_text], ids]), torch.cat([mask, mask[neg_text], mask])
    itm_images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])
    logits = blip_itm_logits(model, itm_ids, itm_mask, itm_images)
    return itc_from_sim(sim) + F.cross_entropy(logits.float(), itm_labels(ids.shape[0], ids.device))


def blip_itm_logits(model, ids, mask, image_embeds) -> torch.Tensor:
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    fused = model.text_encoder(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts
    ).last_hidden_state
    return model.itm_head(fused[:, 0])


# ----- ITM scoring -------------------------------------------------------------------------------------------


def pair_rows(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image row and caption row of each of the ITM_IMAGES x ITM_CAPTIONS pairs (image-major)."""
    images = torch.arange(ITM_IMAGES, device=device).repeat_interleave(ITM_CAPTIONS)
    captions = torch.arange(ITM_CAPTIONS, device=device).repeat(ITM_IMAGES)
    return images, captions


def vlp_itm_scorer(model, batch, device: torch.device):
    """Re-ranking as vlp's evaluator does it: the towers' outputs cached; per call, each caption's first fusion
    self-attention once and each image's keys/values once, shared by its pairs without copies."""
    from vlp.model.fusion import group_kv

    with torch.inference_mode(), common.autocast(device):
        image_embeds, _ = model.encode_image(batch["image"][:ITM_IMAGES])
        text_embeds, _ = model.encode_text(batch["input_ids"][:ITM_CAPTIONS], batch["attention_mask"][:ITM_CAPTIONS])
    mask = batch["attention_mask"][:ITM_CAPTIONS]
    _, captions = pair_rows(device)  # image-major: every image's ITM_CAPTIONS pairs are adjacent
    counts = torch.full((ITM_IMAGES,), ITM_CAPTIONS, device=device)

    def score():
        with torch.inference_mode(), common.autocast(device):
            attended = model.fusion.attend_text(text_embeds, mask)  # (C, L, D): once per caption
            kv = group_kv(model.fusion.image_kv(image_embeds), counts)  # (I, H, N, d) per block: once per image
            model.itm_logits(attended[captions], mask[captions], image_kv=kv, text_attended=True)

    return score


def blip_itm_scorers(model, batch, device: torch.device) -> dict[str, Any]:
    """BLIP's ITM head with the vision output cached, and through forward() (vision re-run per pair)."""
    images, captions = pair_rows(device)
    ids, mask = batch["input_ids"][captions], batch["attention_mask"][captions]
    pixels = batch["image"][:ITM_IMAGES]
    with torch.inference_mode(), common.autocast(device):
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state

    def cached():
        with torch.inference_mode(), common.autocast(device):
            blip_itm_logits(model, ids, mask, image_embeds.index_select(0, images))

    def forward():
        with torch.inference_mode(), common.autocast(device):
            model(input_ids=ids, pixel_values=pixels[images], attention_mask=mask, use_itm_head=True)

    return {"blip_cached_vision": cached, "blip_forward": forward}


# ----- worker process ----------------------------------------------------------------------------------------


def build_system(name: str, device: torch.device, ddp: bool = False) -> System:
    builders = {
        "vlp_a": lambda: build_vlp("a", device, ddp),
        "vlp_b": lambda: build_vlp("b", device, ddp),
        "vlp_c": lambda: build_vlp("c", device, ddp),
        "open_clip": lambda: build_open_clip(device, ddp),
        "blip_forward": lambda: build_blip(False, device, ddp),
        "blip_reuse": lambda: build_blip(True, device, ddp),
    }
    return builders[name]()


def handle(system: System, device: torch.device, command: str, arg: Any) -> Any:
    """One request from the parent; every answer is plain data."""
    if command == "train":
        return [common.timed(system.step, device) for _ in range(arg)]
    if command == "itm":
        system.model.eval()
        try:
            return [common.timed(system.itm[arg], device)]
        finally:
            system.model.train()
    if command == "measure":
        return measure(system, device)
    if command == "profile":
        system.step()  # profile a warm step
        return common.top_ops(system.step, device)
    raise ValueError(f"unknown command {command!r}")


def measure(system: System, device: torch.device) -> dict[str, Any]:
    """Memory first (before the counting step adds its own), then the FLOPs of one training step."""
    params = sum(p.numel() for p in system.model.parameters())
    trainable = sum(p.numel() for p in system.model.parameters() if p.requires_grad)
    out = {"peak_rss_mb": common.peak_rss_mb(), "rss_mb": common.current_rss_mb()}
    out.update(peak_device_mb=common.peak_device_mb(device), params=params, trainable_params=trainable)
    out["flops_per_step"] = common.count_flops(system.step)
    return {**out, **system.info}


def worker(name: str, device_name: str, ddp: bool, conn) -> None:
    """Build one system, then answer (command, arg) requests until told to stop."""
    device = torch.device(device_name)
    try:
        torch.manual_seed(0)
        system = build_system(name, device, ddp)
        conn.send(("ok", {"rss_after_build_mb": common.current_rss_mb(), "itm_modes": list(system.itm)}))
    except Exception:  # reported to the parent, which shows a "not run" row
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, arg = conn.recv()
        if command == "stop":
            return
        try:
            conn.send(("ok", handle(system, device, command, arg)))
        except Exception:  # reported to the parent; the system drops out
            conn.send(("error", traceback.format_exc()))


class Workers:
    """One process per system; requests go to one process at a time, so only one system computes at once."""

    def __init__(self, names: list[str], device: torch.device, ddp: bool = False):
        ctx = mp.get_context("spawn")
        self.conns, self.procs, self.errors, self.build = {}, {}, {}, {}
        for name in names:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(name, str(device), ddp, child), daemon=True)
            proc.start()
            self.conns[name], self.procs[name] = parent, proc
            self._await_build(name)  # one build at a time: builds compete for the same cores

    def _await_build(self, name: str) -> None:
        status, payload = self.conns[name].recv()
        if status == "ok":
            self.build[name] = payload
        else:
            self.errors[name] = payload
            self.procs[name].join()
            del self.conns[name], self.procs[name]

    @property
    def alive(self) -> list[str]:
        return list(self.conns)

    def ask(self, name: str, command: str, arg: Any = None) -> Any:
        """The answer, or None after recording the error under the system's name, or ``name command arg``."""
        try:
            self.conns[name].send((command, arg))
            status, payload = self.conns[name].recv()
        except (EOFError, OSError) as err:  # the process died (out of memory, a crash in native code)
            status, payload = "error", f"worker exited: {err!r}, exit code {self.procs[name].exitcode}"
            del self.conns[name]
        if status == "ok":
            return payload
        self.errors[name if command == "train" or name not in self.conns else f"{name} {command} {arg}"] = payload
        return None

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(("stop", None))
        for proc in self.procs.values():
            proc.join(timeout=60)


# ----- rounds ------------------------------------------------------------------------------------------------


def rotated(names: list[str], shift: int) -> list[str]:
    shift %= max(len(names), 1)
    return names[shift:] + names[:shift]


def run_rounds(
    workers: Workers, names: list[str], command: str, args: dict, warmup: int, timed: int, on_round=None
) -> dict:
    """``warmup + timed`` rounds; each round asks every name once, starting one later than the last round.

    ``args`` maps each name to (worker, request arg); ``on_round()`` runs before every timed round. Returns
    name -> list of timed seconds (one per round).
    """
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + timed):
        if on_round is not None and round_index >= warmup:
            on_round()
        for name in rotated(names, round_index):
            worker_name, arg = args[name]
            if worker_name not in workers.alive or name not in times:
                continue
            answer = workers.ask(worker_name, command, arg)
            if answer is None:
                times.pop(name)
            elif round_index >= warmup:
                times[name].extend(answer)
    return times


def paired_ratio(ours: list[float], peer: list[float]) -> dict[str, float] | None:
    """Median, min and max over rounds of peer time / our time: pairs/s of ours over the peer's."""
    ratios = sorted(p / o for o, p in zip(ours, peer))
    if not ratios:
        return None
    return {"median": common.median(ratios), "min": ratios[0], "max": ratios[-1]}


# ----- the benchmark -----------------------------------------------------------------------------------------


def round_counts(quick: bool, device: torch.device) -> tuple[int, int]:
    """(warm-up, timed) rounds: GPU steps take milliseconds, so a GPU gets more of both."""
    if device.type == "cuda":
        return (3, 10) if quick else (5, 30)
    return (1, 4) if quick else (3, 10)


def train_results(workers: Workers, times: dict, peak: float) -> dict[str, dict]:
    """Per system: step times, pairs/s, memory, FLOPs and utilisation of the measured matmul peak."""
    systems = {}
    for name, steps in times.items():
        stats = workers.ask(name, "measure") or {}
        step_s = common.median(steps)
        flops = stats.get("flops_per_step")
        systems[name] = {
            "step_s": steps,
            "median_step_s": step_s,
            "best_step_s": min(steps),
            "pairs_per_s": BATCH / step_s,
            "mfu": flops / step_s / peak if flops else None,
            **workers.build.get(name, {}),
            **stats,
        }
    return systems


def comparisons(times: dict, systems: dict) -> list[dict[str, Any]]:
    rows = []
    for ours, peer, target in COMPARISONS:
        if ours not in systems or peer not in systems:
            rows.append({"ours": ours, "peer": peer, "target": target, "status": "not run"})
            continue
        ratio = paired_ratio(times[ours], times[peer])
        of_medians = systems[ours]["pairs_per_s"] / systems[peer]["pairs_per_s"]
        of_best = min(times[peer]) / min(times[ours])  # the least disturbed step of each: robust to bursts
        met = ratio["median"] >= target
        rows.append(
            {"ours": ours, "peer": peer, "target": target, "ratio": ratio, "ratio_of_medians": of_medians}
            | {"ratio_of_best": of_best, "status": "met" if met else "MISSED"}
        )
    return rows


def profile_missed(workers: Workers, rows: list[dict], always: bool) -> dict[str, list]:
    """Top ops by self CPU time for both sides of every missed comparison (every comparison with ``always``)."""
    wanted = {name for row in rows if always or row["status"] == "MISSED" for name in (row["ours"], row["peer"])}
    return {name: workers.ask(name, "profile") for name in sorted(wanted) if name in workers.alive}


def itm_benchmark(workers: Workers, warmup: int, timed: int) -> dict[str, Any]:
    """Pairs/s of ITM scoring: vlp with cached image keys/values against BLIP's ITM head, rounds interleaved."""
    args = {mode: (name, mode) for name in workers.alive for mode in workers.build[name]["itm_modes"]}
    times = run_rounds(workers, list(args), "itm", args, warmup, timed)
    pairs = ITM_IMAGES * ITM_CAPTIONS
    modes = {mode: {"call_s": t, "pairs_per_s": pairs / common.median(t)} for mode, t in times.items() if t}
    ratios = {}
    for peer in ("blip_cached_vision", "blip_forward"):
        if "vlp_cached_kv" in times and peer in times:
            ratios[f"vlp_cached_kv/{peer}"] = paired_ratio(times["vlp_cached_kv"], times[peer])
    return {"pairs_per_call": pairs, "modes": modes, "ratios": ratios}


class RoundConditions:
    """The machine's state before every timed round: its matmul peak now, and its 1-minute load average.

    The peak used for MFU is the best of all rounds, measured in the same conditions as the steps; the load
    average shows which rounds shared the cores with other work.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int):
        self.device, self.dtype, self.size = device, dtype, size
        self.peaks: list[float] = []
        self.loads: list[float] = []

    def record(self) -> None:
        self.loads.append(round(os.getloadavg()[0], 2))
        self.peaks.append(common.matmul_peak_flops(self.device, self.dtype, self.size, repeats=3))

    def peak(self) -> float:
        if not self.peaks:
            self.record()
        return max(self.peaks)


def use_ddp(choice: str, device: torch.device) -> bool:
    """``auto``: the DDP strategy on one device on GPUs (as a GPU run trains), plain modules on CPUs."""
    return device.type == "cuda" if choice == "auto" else choice == "on"


def run(
    quick: bool = False,
    device_name: str | None = None,
    profile: bool = False,
    systems=TRAIN_SYSTEMS,
    ddp: str = "auto",
) -> dict:
    """The whole training and ITM benchmark; returns the JSON payload."""
    device = common.pick_device(device_name)
    wrap = use_ddp(ddp, device)
    dtype = common.compute_dtype(device)
    peak_size = 2048 if device.type == "cpu" else 8192
    warmup, timed = round_counts(quick, device)
    conditions = RoundConditions(device, dtype, peak_size)

    workers = Workers(list(systems), device, wrap)
    try:
        args = {name: (name, 1) for name in workers.alive}
        times = run_rounds(workers, workers.alive, "train", args, warmup, timed, on_round=conditions.record)
        times = {name: steps for name, steps in times.items() if steps}
        results = train_results(workers, times, conditions.peak())
        rows = comparisons(times, results)
        itm = itm_benchmark(workers, warmup, max(timed, 3))
        profiles = profile_missed(workers, rows, profile)
    finally:
        workers.close()
    return {
        "machine": common.machine_info(device),
        "sizes": sizes(),
        "precision": str(dtype),
        "strategy": "DistributedDataParallel, one process per system (world size 1)" if wrap else "single device",
        "matmul_peak": {"flops_per_s": conditions.peak(), "size": peak_size, "dtype": str(dtype)}
        | {"per_round": conditions.peaks},
        "rounds": {"warmup": warmup, "timed": timed, "load_average_1min": conditions.loads},
        "systems": results,
        "comparisons": rows,
        "itm_scoring": itm,
        "profiles": profiles,
        "errors": workers.errors,
    }


def sizes() -> dict[str, Any]:
    return {
        "batch": BATCH,
        "image": IMAGE,
        "patch": PATCH,
        "width": WIDTH,
        "depth": DEPTH,
        "heads": HEADS,
        "mlp": MLP,
        "text_len": TEXT_LEN,
        "embed_dim": EMBED,
        "queue": QUEUE,
        "vlp_split": "8-layer BERT: lower 4 = text tower, top 4 initialise the 4 fusion blocks (ALBEF)",
        "blip_text": "4 layers, each with self- and cross-attention: text mode for ITC, cross mode for ITM",
        "itm_pairs": f"{ITM_IMAGES} images x {ITM_CAPTIONS} captions per call",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 4 timed rounds")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--profile", action="store_true", help="profile every comparison, not only missed ones")
    parser.add_argument("--systems", nargs="+", choices=TRAIN_SYSTEMS, default=list(TRAIN_SYSTEMS))
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--ddp", choices=DDP_CHOICES, default="auto", help="auto: on for cuda, off for cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    payload = run(args.quick, args.device, args.profile, tuple(args.systems), args.ddp)
    common.write_json(args.out / "train.json", payload)
    return payload


if __name__ == "__main__":
    main()
