"""Two-process DistributedDataParallel training on CPU (gloo), stage 2: the replicas stay
identical, only rank 0 writes, each rank trains on its own slices. Stage 1 refuses several
processes (its two-process run hung or failed intermittently)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from _stage2_data import write_dataset
from cps4_engine.checkpoint import load_weights, save_weights
from cps4_engine.distributed import DistContext, rank_shard
from cps4_engine.stage2 import Stage2Config, Stage2Trainer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, data: str, out: str, results: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    config = Stage2Config(
        data=data, out=out, labeled=2, method="mean-teacher", preset="tiny", max_steps=3,
        device="cpu", seed=0, validation=1, validation_every=3,
    )
    trainer = Stage2Trainer(config)
    events = list(trainer.run())
    save_weights(Path(results) / f"rank{rank}.safetensors", trainer.student.state_dict())
    (Path(results) / f"rank{rank}.json").write_text(json.dumps({"events": len(events)}))


def test_two_gloo_processes_train_identical_replicas(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", cases=6)
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(results)), nprocs=2, join=True)

    first = load_weights(results / "rank0.safetensors")
    second = load_weights(results / "rank1.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name

    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [1, 2, 3]
    saved = load_weights(out / "last.safetensors")
    assert all(torch.allclose(saved[name], first[name], atol=1e-6) for name in first)
    assert json.loads((results / "rank0.json").read_text())["events"] > 0
    assert json.loads((results / "rank1.json").read_text())["events"] == 0


def test_rank_shards_partition_the_items() -> None:
    shards = [rank_shard(7, DistContext(rank, 3, rank, torch.device("cpu"))).tolist() for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert rank_shard(1, DistContext(1, 2, 1, torch.device("cpu"))).tolist() == [0]



# Stage 1 with the frozen text backbone (cached prompt states, the default) and with a
# fine-tuned one plus the contrastive term: each has trainable parameters that no loss
# term reaches (the image head without the contrastive term, the backbone's pooler).
