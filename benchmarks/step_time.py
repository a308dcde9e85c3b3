"""Seconds per optimiser step of a `cpu`-preset trainer on real data, without writing a run.

Compares code side by side: run it alternately against two checkouts on the same load and
compare the ratios (absolute times on a shared machine mean little)::

    for i in 1 2 3; do
        PYTHONPATH=/path/to/old python benchmarks/step_time.py --stage 1 --label before
        PYTHONPATH=/path/to/new python benchmarks/step_time.py --stage 1 --label after
    done

Stage 1 times :class:`~cps4_engine.stage1.Stage1Trainer`'s step, stage 2
:class:`~cps4_engine.stage2.Stage2Trainer`'s (``--method``; ``cps4`` needs ``--vlm``):
loss, backward and optimiser step, as the training loop runs them (``--cpu-bf16``: under
the loop's CPU bfloat16 autocast).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def step_seconds(args: argparse.Namespace) -> float:
    import torch

    from cps4_engine import distributed
    from cps4_engine.bench import find_realdata
    from cps4_engine.training import autocast

    torch.set_num_threads(args.threads)
    data = args.data or (find_realdata(None) or Path("../shared/realdata")) / "vb3_l1l5_t1"
    out = Path(tempfile.mkdtemp(prefix="cps4-step-time-")) / "run"
    common = {"data": data, "out": out, "labeled": args.labeled, "preset": "cpu", "train_cases": 14,
              "seed": args.seed, "device": "cpu", "validation": 2, "cpu_bf16": args.cpu_bf16}
    if args.stage == 1:
        from cps4_engine.stage1 import Stage1Config, Stage1Trainer

        trainer = Stage1Trainer(Stage1Config(**common))
    else:
        from cps4_engine.stage2 import Stage2Config, Stage2Trainer

        trainer = Stage2Trainer(Stage2Config(**common, method=args.method, vlm=args.vlm))
    trainer.setup(distributed.setup("cpu"))

    def one_step(step: int) -> None:
        trainer.model.train()
        with autocast(torch.device("cpu"), False, cpu_bf16=args.cpu_bf16):
            total, _ = trainer.loss(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
        trainer.optimizer.step()
        trainer.after_step(step + 1)

    for step in range(args.warmup):
        one_step(step)
    began = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        one_step(step)
    return (time.perf_counter() - began) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--method", default="mean-teacher", help="stage-2 method")
    parser.add_argument("--vlm", type=Path, default=None, help="stage-1 run (stage 2 with --method cps4)")
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: realdata vb3_l1l5_t1)")
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast of the step, as the loop runs it")
    parser.add_argument("--label", default="", help="printed before the figure")
    args = parser.parse_args()
    print(f"{args.label} stage {args.stage}: {step_seconds(args):.3f} s per step".strip())


if __name__ == "__main__":
    main()
