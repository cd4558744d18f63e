"""N processes with batch B must give the loss and gradients of one process with batch N*B."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_distributed, tiny_model_config
from torch.nn.parallel import DistributedDataParallel

from vlp.dist import all_gather_nograd, all_gather_with_grad, all_reduce_sum, get_world_size
from vlp.losses import itc_loss
from vlp.model import VLPModel

DIM_IN, DIM_OUT = 12, 8
# Uneven shards on purpose: rank 0 holds 5 pairs, rank 1 holds 2 (a short last batch).
SHARDS = [slice(0, 5), slice(5, 7)]
IDS = torch.tensor([0, 1, 1, 2, 3, 3, 4])  # image 1 is in rank 0 twice, image 3 spans both ranks


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(7, DIM_IN, generator=gen), torch.randn(7, DIM_IN, generator=gen)


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(DIM_IN, DIM_OUT), nn.Linear(DIM_IN, DIM_OUT)

    def forward(self, image_x, text_x):
        return F.normalize(self.image(image_x), dim=-1), F.normalize(self.text(text_x), dim=-1)


def _itc_step(towers, image_x, text_x, ids):
    image_feat, text_feat = towers(image_x, text_x)
    loss = itc_loss(image_feat, text_feat, 0.07, ids)
    loss.backward()
    return loss.detach()


def _itc_worker(rank, world):
    image_x, text_x = _inputs()
    towers = Towers()
    model = DistributedDataParallel(towers)
    shard = SHARDS[rank]
    loss = _itc_step(model, image_x[shard], text_x[shard], IDS[shard])
    world_loss = all_reduce_sum(loss) / get_world_size()
    return dict(loss=world_loss, grads={k: p.grad.clone() for k, p in towers.named_parameters()})


def test_itc_two_processes_match_one_process(tmp_path):
    image_x, text_x = _inputs()
    towers = Towers()
    single_loss = _itc_step(towers, image_x, text_x, IDS)
    results = run_distributed(_itc_worker, 2, tmp_path)
    for result in results:
        assert torch.allclose(result["loss"], single_loss, atol=1e-6)
        for name, param in towers.named_parameters():
            assert torch.allclose(result["grads"][name], param.grad, atol=1e-5), name


def _gather_worker(rank, world):
    x = torch.full((3 if rank == 0 else 1, 2), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)  # (4, 2)
    (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
    return dict(gathered=gathered.detach(), grad=x.grad, ids=all_gather_nograd(torch.tensor([rank] * (2 - rank))))


def test_gather_with_grad_returns_each_rank_its_summed_gradient(tmp_path):
    results = run_distributed(_gather_worker, 2, tmp_path)
    expected = torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]])
    for result in results:
        assert torch.equal(result["gathered"], expected)
        assert torch.equal(result["ids"], torch.tensor([0, 0, 1]))
    # Both ranks' losses weight row j by j + 1, so each rank's rows receive 2 * (j + 1).
    assert torch.equal(results[0]["grad"], torch.tensor([[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]))
    assert torch.equal(results[1]["grad"], torch.tensor([[8.0, 8.0]]))


def _model_batch(model, rows):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 32, 32, generator=gen)
    captions = ["a red circle", "a blue square left of a star", "two green stars", "one cat", "a dog", "red"]
    tokens = model.tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")
    batch = dict(image=images, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    batch["image_id"] = torch.tensor([0, 0, 1, 2, 3, 3])
    return {key: value[rows] for key, value in batch.items()}


def _build_model(itm_negatives="local"):
    torch.manual_seed(0)
    return VLPModel(tiny_model_config(queue_size=8, itm=itm_negatives == "world", itm_negatives=itm_negatives))


def _model_worker(rank, world):
    model = _build_model()
    ddp = DistributedDataParallel(model)
    out = ddp(_model_batch(model, slice(rank * 3, rank * 3 + 3)))
    out["loss"].backward()
    model.after_optimizer_step()
    return dict(
        loss=all_reduce_sum(out["itc_loss"].detach()) / world,
        grad=model.vision_proj.weight.grad.clone(),
        queue=model.queue.text_queue.clone(),
        count=int(model.queue.count),
    )


def test_model_itc_with_momentum_and_queue_two_processes_match_one(tmp_path):
    # Two steps in one process with batch 6 versus two ranks with batch 3: the queue makes the second step
    # depend on the first step's enqueued momentum features, which must be the same world rows.
    model = _build_model()
    out = model(_model_batch(model, slice(0, 6)))
    out["itc_loss"].backward()
    model.after_optimizer_step()
    results = run_distributed(_model_worker, 2, tmp_path)
    for result in results:
        assert torch.allclose(result["loss"], out["itc_loss"].detach(), atol=1e-5)
        assert torch.allclose(result["grad"], model.vision_proj.weight.grad, atol=1e-5)
        assert torch.allclose(result["queue"], model.queue.text_queue, atol=1e-6)
        assert result["count"] == 6


def _world_itm_worker(rank, world):
    model = _build_model("world")
    ddp = DistributedDataParallel(model)
    out = ddp(_model_batch(model, slice(rank * 3, rank * 3 + 3)))
    out["loss"].backward()
    return dict(
        itm=out["itm_loss"].detach(),
        invalid=out["itm_invalid_rows"],
        grad=model.fusion.blocks[0].cross_attn.key.weight.grad.norm(),
    )


def test_world_batch_hard_negatives_run_on_two_processes(tmp_path):
    results = run_distributed(_world_itm_worker, 2, tmp_path)
    for result in results:
        assert torch.isfinite(result["itm"]) and result["grad"] > 0
        assert int(result["invalid"]) == 0
