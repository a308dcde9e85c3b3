"""Two-process DistributedDataParallel training on CPU (gloo), stage 1 and stage 2: the
replicas stay identical, every rank runs every step, only rank 0 writes, each rank trains
on its own slices. A run that hangs fails the test after a timeout."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

from _stage2_data import write_dataset
from cps4_engine.checkpoint import load_training_state, load_weights, save_weights
from cps4_engine.distributed import DistContext, rank_shard
from cps4_engine.models.segmenter import build_segmenter
from cps4_engine.presets import get_preset
from cps4_engine.stage1 import RELIABILITY_FILE, Stage1Config, Stage1Trainer
from cps4_engine.stage2 import Stage2Config, Stage2Trainer
from cps4_engine.training import STATE_FILE
from cps4_engine.synthetic import write_synthetic_dataset

WORLD_SIZE = 2
# A tiny two-process run takes 15-40 s on two busy CPUs; past this it is hung.
TIMEOUT_S = 240
# A worker still running this close to the timeout prints where it waits, then exits.
STACK_DUMP_MARGIN_S = 20


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the probes stay bound until all are picked)."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def _join_as(rank: int, port: int) -> None:
    """The environment ``torchrun`` gives rank ``rank`` of a group meeting at ``port``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _spawn(worker: Callable[..., None], *args: Any) -> None:
    """Run ``worker(rank, *args)`` in ``WORLD_SIZE`` processes; fail instead of hanging."""
    processes = mp.spawn(worker, args=args, nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not processes.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"{WORLD_SIZE} training processes still running after {TIMEOUT_S} s: hung")


def _watch_for_hang() -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S - STACK_DUMP_MARGIN_S, exit=True)


def _tiny_mean_teacher(data: str, out: str, steps: int) -> Stage2Config:
    """A `tiny`-preset mean-teacher run of ``steps`` steps, validated once at the end."""
    return Stage2Config(
        data=data, out=out, labeled=2, method="mean-teacher", preset="tiny", max_steps=steps,
        device="cpu", seed=0, validation=1, validation_every=steps,
    )


def _worker(rank: int, port: int, data: str, out: str, results: str) -> None:
    _watch_for_hang()
    _join_as(rank, port)
    trainer = Stage2Trainer(_tiny_mean_teacher(data, out, steps=3))
    events = list(trainer.run())
    save_weights(Path(results) / f"rank{rank}.safetensors", trainer.student.state_dict())
    # What each rank would draw next: a resumed rank must draw the same.
    next_draws = {name: torch.rand(4, generator=generator).tolist() for name, generator in trainer.generators.items()}
    (Path(results) / f"rank{rank}.json").write_text(json.dumps({"events": len(events), "next_draws": next_draws}))


def test_two_gloo_processes_train_identical_replicas(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", cases=6)
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    _spawn(_worker, _free_ports(1)[0], str(data), str(out), str(results))

    first = load_weights(results / "rank0.safetensors")
    second = load_weights(results / "rank1.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name

    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [1, 2, 3]
    saved = load_weights(out / "last.safetensors")
    assert all(torch.allclose(saved[name], first[name], atol=1e-6) for name in first)
    rank0, rank1 = (json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["events"] > 0 and rank1["events"] == 0

    # The state file holds each rank's generators: a resumed rank continues its own draws.
    assert rank0["next_draws"] != rank1["next_draws"]
    optimizer = torch.optim.AdamW(build_segmenter(get_preset("tiny")).parameters())
    for rank, recorded in ((0, rank0), (1, rank1)):
        generators = {name: torch.Generator() for name in recorded["next_draws"]}
        load_training_state(out / STATE_FILE, optimizer, generators=generators, rank=rank)
        resumed = {name: torch.rand(4, generator=generator).tolist() for name, generator in generators.items()}
        assert resumed == recorded["next_draws"], f"rank {rank} would not resume its own draws"


def test_rank_shards_partition_the_items() -> None:
    shards = [rank_shard(7, DistContext(rank, 3, rank, torch.device("cpu"))).tolist() for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert rank_shard(1, DistContext(1, 2, 1, torch.device("cpu"))).tolist() == [0]


# Stage 1 with the frozen text backbone (cached prompt states, the default) and with a
# fine-tuned one plus the contrastive term: each has trainable parameters that no loss
# term reaches (the image head without the contrastive term, the backbone's pooler).
STAGE1_VARIANTS = {
    "frozen": {},
    "fine-tuned": {"freeze_text_encoder": False, "contrastive_weight": 0.5},
}
STAGE1_STEPS = 4


def _stage1_out(root: str, variant: str, rank: int) -> Path:
    """Rank 0 trains into ``root/variant``; any other rank is given a folder of its own, so
    the test sees that it writes nothing there."""
    return Path(root) / (variant if rank == 0 else f"{variant}-rank{rank}")


def _stage1_worker(rank: int, ports: list[int], data: str, root: str) -> None:
    _watch_for_hang()
    for (name, changes), port in zip(STAGE1_VARIANTS.items(), ports):
        # One rendezvous port per run: rank 1 leaves a run's group while rank 0 still
        # validates and writes, and would otherwise rejoin rank 0's old store
        # (distributed.teardown).
        _join_as(rank, port)
        config = Stage1Config(
            data=data, out=str(_stage1_out(root, name, rank)), labeled=2, preset="tiny",
            max_steps=STAGE1_STEPS, device="cpu", text_encoder="tiny", seed=0, validation=1,
            validation_every=2, **changes,
        )
        trainer = Stage1Trainer(config)
        torch.manual_seed(config.seed)  # as the trainer seeds before it builds the model
        initial = trainer.build_model().state_dict()
        events = list(trainer.events())
        results = Path(root) / "results" / name
        results.mkdir(parents=True, exist_ok=True)
        save_weights(results / f"rank{rank}.safetensors", trainer.model.state_dict())
        if rank == 0:
            save_weights(results / "initial.safetensors", initial)
        images = next(trainer.batches)[0]
        (results / f"rank{rank}.json").write_text(json.dumps({
            "kinds": [event.kind for event in events], "steps": trainer.step,
            "start": events[0].message if events else None,
            "next_batch_sum": float(images.sum()),
        }))


def test_stage1_on_two_gloo_processes_keeps_identical_replicas_and_only_rank0_writes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, cases=4, seed=11)
    _spawn(_stage1_worker, _free_ports(len(STAGE1_VARIANTS)), str(data), str(tmp_path))

    for name in STAGE1_VARIANTS:
        results, out = tmp_path / "results" / name, tmp_path / name
        rank0, rank1 = (json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1))
        # Each rank draws from its own shard, so only DDP's averaged gradients keep them equal.
        assert rank0["next_batch_sum"] != rank1["next_batch_sum"], name
        first, second = load_weights(results / "rank0.safetensors"), load_weights(results / "rank1.safetensors")
        initial = load_weights(results / "initial.safetensors")
        assert first.keys() == second.keys() == initial.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key} differs between the ranks"
        moved = [key for key in first if not torch.equal(first[key], initial[key])]
        assert any(key.startswith("image_encoder.") for key in moved) and "head.log_scale" in moved, name
        assert ("image_head.bias" in moved) == (name == "fine-tuned")
        assert any(key.startswith("text_encoder.backbone.encoder.") for key in moved) == (name == "fine-tuned")

        assert rank0["steps"] == rank1["steps"] == STAGE1_STEPS
        assert rank0["kinds"][0] == "start" and rank0["kinds"][-1] == "end"
        assert "2 processes, each on its own share of the slices" in rank0["start"]
        assert rank0["kinds"].count("step") == STAGE1_STEPS and rank0["kinds"].count("validation") == 2
        assert rank1["kinds"] == []
        assert not _stage1_out(str(tmp_path), name, 1).exists(), f"{name}: rank 1 wrote a run folder"

        history = json.loads((out / "history.json").read_text())
        assert [entry["step"] for entry in history["steps"]] == list(range(1, STAGE1_STEPS + 1))
        assert [entry["step"] for entry in history["validation"]] == [2, 4]
        assert all(torch.equal(load_weights(out / "last.safetensors")[key], first[key]) for key in first)
        best = max(history["validation"], key=lambda entry: entry["dice"])
        reliability = json.loads((out / RELIABILITY_FILE).read_text())
        assert reliability["step"] == best["step"] and reliability["volumes"] == 1
        assert (out / "model.safetensors").is_file()
        assert json.loads((out / "config.json").read_text())["stage"] == 1


def _cancelling_worker(rank: int, port: int, data: str, out: str, results: str) -> None:
    from cps4_engine.cli._progress import print_training_progress
    from cps4_engine.events import CancelToken

    _watch_for_hang()
    _join_as(rank, port)
    config = _tiny_mean_teacher(data, out, steps=50)
    cancel = CancelToken()
    if rank == 1:  # Ctrl-C reaches one process before its first step
        cancel.cancel()
    status = print_training_progress(Stage2Trainer(config).run(cancel), cancel, "stage 2")
    (Path(results) / f"rank{rank}.json").write_text(json.dumps({"status": status}))


def test_a_cancel_on_one_rank_makes_every_torchrun_process_exit_as_cancelled(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", cases=6)
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    _spawn(_cancelling_worker, _free_ports(1)[0], str(data), str(out), str(results))

    statuses = [json.loads((results / f"rank{rank}.json").read_text())["status"] for rank in range(WORLD_SIZE)]
    assert statuses == [130, 130]
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == []  # cancelled before the first step, checkpointed by rank 0
    assert (out / STATE_FILE).is_file()


# How long the late rank stays inside the group; the other rank's exit time is compared to it.
LATE_RANK_DELAY_S = 2.0


def _leaving_worker(rank: int, port: int, results: str, failing: bool) -> None:
    from cps4_engine.distributed import joined

    _watch_for_hang()
    _join_as(rank, port)
    record: dict[str, float] = {}
    try:
        with joined("cpu"):
            if rank == 1:
                time.sleep(LATE_RANK_DELAY_S)
            record["leaving"] = time.time()
            if failing:
                raise RuntimeError(f"rank {rank} fails")
    except RuntimeError:
        pass
    record["left"] = time.time()
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("failing", [False, True], ids=["normal-exit", "failure"])
def test_ranks_leave_the_group_together_unless_a_failure_leaves_it(tmp_path: Path, failing: bool) -> None:
    _spawn(_leaving_worker, _free_ports(1)[0], str(tmp_path), failing)

    early, late = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE))
    if failing:  # the failing rank does not wait at the barrier for the late one
        assert early["left"] < late["leaving"]
    else:  # rank 0 waits at the barrier until the late rank is done
        assert early["left"] >= late["leaving"]
