"""Two gloo processes on loopback give exactly the single-process retrieval metrics."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_fixtures import TinyRetrievalSet, tiny_model
from torch.utils.data import DataLoader, DistributedSampler

from vlp.eval import RetrievalConfig, run_retrieval

WORLD = 2
N_IMAGES, CAPTIONS = 13, 3  # odd: the sampler pads with a repeated image, caption shards are 19 and 20
CFG = RetrievalConfig(k=5, batch_size=4, rerank_batch_size=16, chunk_size=4)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard_loaders(ds, rank: int) -> dict[str, object]:
    """Two ways to split the images: a padding DistributedSampler, and everything on rank 1 (rank 0 empty)."""
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=False)
    lopsided = DataLoader(ds, batch_size=4) if rank == 1 else []
    return {"sampler": DataLoader(ds, batch_size=4, sampler=sampler), "lopsided": lopsided}


def summary(result) -> dict:
    return {
        "metrics": result.metrics,
        "tr_ranks": result.tr_ranks,
        "ir_ranks": result.ir_ranks,
        "i2t": result.i2t.indices,
        "t2i": result.t2i.indices,
        "i2t_scores": result.i2t.scores,
        "t2i_scores": result.t2i.scores,
        "stats": result.stats,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, ds = tiny_model(seed=0), TinyRetrievalSet(N_IMAGES, CAPTIONS, seed=1)
        for name, image_loader in shard_loaders(ds, rank).items():
            result = run_retrieval(model, image_loader, ds.texts, ds.txt2img, ds.img2txt, CFG)
            torch.save(summary(result), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(free_loopback_port(), str(tmp_path)), nprocs=WORLD, join=True)

    model, ds = tiny_model(seed=0), TinyRetrievalSet(N_IMAGES, CAPTIONS, seed=1)
    single = summary(run_retrieval(model, DataLoader(ds, batch_size=4), ds.texts, ds.txt2img, ds.img2txt, CFG))
    for name in ("sampler", "lopsided"):
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=False)
            assert got["metrics"] == single["metrics"], (name, rank)
            for key in ("tr_ranks", "ir_ranks", "i2t", "t2i"):
                np.testing.assert_array_equal(got[key], single[key], err_msg=f"{name} rank {rank} {key}")
            for key in ("i2t_scores", "t2i_scores"):
                np.testing.assert_allclose(got[key], single[key], atol=1e-5, err_msg=f"{name} rank {rank} {key}")
            # The same distinct pairs, split between the processes; each image's keys/values computed once.
            assert got["stats"]["pairs_scored"] == single["stats"]["pairs_scored"]
            assert got["stats"]["kv_images"] == N_IMAGES
