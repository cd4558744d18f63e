"""VLPDataModule: loaders, ranks, epochs reaching workers, checkpoint state, a real Lightning fit and resume."""

from __future__ import annotations

import lightning as L
import torch

from vlp.data import DataProgressCallback


def test_train_and_val_batches(build_dm):
    dm = build_dm(synthetic_train_size=10, synthetic_eval_size=6, batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(10))
    val = list(dm.val_dataloader())
    assert [b["index"].tolist() for b in val] == [[0, 1, 2, 3], [4, 5]]
    assert val[0]["image"].shape == (4, 3, 32, 32)


def test_eval_shards_over_two_ranks(build_dm):
    shards = []
    for rank in range(2):
        dm = build_dm(synthetic_eval_size=7)
        dm._rank, dm._world = rank, 2
        dm.setup("validate")
        shards.append([i for b in dm.val_dataloader() for i in b["index"].tolist()])
    assert shards == [[0, 1, 2], [3, 4, 5, 6]]


def test_epoch_reaches_persistent_workers(build_dm):
    # Caption paraphrases are re-drawn per epoch; with persistent workers the epoch travels through shared memory.
    dm = build_dm(synthetic_train_size=24, num_workers=2, persistent_workers=True, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    captions = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        captions.append({i: c for b in loader for i, c in zip(b["index"].tolist(), b["input_ids"].tolist())})
    assert captions[0].keys() == captions[1].keys() == set(range(24))
    assert sum(captions[0][i] != captions[1][i] for i in range(24)) >= 12


def test_state_dict_resumes_mid_epoch(build_dm):
    first = build_dm(synthetic_train_size=20, batch_size=3)
    first.setup("fit")
    loader = first.train_dataloader()
    first.set_epoch(2)
    all_indices = []
    for batch in loader:
        all_indices.append(batch["index"].tolist())
        if len(all_indices) <= 3:
            first.train_batch_done(batch)
    state = first.state_dict()
    assert state["sampler"]["epoch"] == 2 and state["sampler"]["start"] == 9

    # Restored before the loader exists, as Lightning does.
    second = build_dm(synthetic_train_size=20, batch_size=3)
    second.load_state_dict(state)
    second.setup("fit")
    rest = [i for b in second.train_dataloader() for i in b["index"].tolist()]
    assert rest == [i for b in all_indices[3:] for i in b]


class _Recorder(L.LightningModule):
    """Records the sample indices of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen += [(self.current_epoch, i) for i in batch["index"].tolist()]
        return self.layer(batch["image"].mean(dim=(2, 3))).mean()  # (B, 3) -> (B, 1) -> scalar

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _SaveAt(L.Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _trainer(callbacks, max_epochs=2):
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip


def test_lightning_fit_and_mid_epoch_resume(build_dm, tmp_path):
    ckpt = str(tmp_path / "mid.ckpt")

    # Uninterrupted run: every sample once per epoch; a checkpoint after step 5 (epoch 1, batch 2).
    full_dm = build_dm(synthetic_train_size=12, batch_size=4)
    full = _Recorder()
    _trainer([DataProgressCallback(), _SaveAt(5, ckpt)]).fit(full, datamodule=full_dm)
    for epoch in range(2):
        assert sorted(i for e, i in full.seen if e == epoch) == list(range(12))
    assert torch.load(ckpt, weights_only=False)["VLPDataModule"]["sampler"] == {
        "epoch": 1, "start": 8, "num_samples": 12, "seed": 0, "group_size": 1
    }  # fmt: skip

    # Resumed run continues with the samples the first run trained on after the checkpoint.
    resumed_dm = build_dm(synthetic_train_size=12, batch_size=4)
    resumed = _Recorder()
    _trainer([DataProgressCallback()]).fit(resumed, datamodule=resumed_dm, ckpt_path=ckpt)
    assert resumed.seen == full.seen[20:]
