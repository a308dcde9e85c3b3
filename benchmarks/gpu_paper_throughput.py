"""Stage-2 throughput of the ``paper`` preset with mixed precision (issue 4's GPU check).

Writes a 12-case synthetic dataset, pretrains stage 1 for a few steps (so CPS4 has prompt
maps to cache), then trains stage 2 with mean teacher and with CPS4 under bf16 autocast
and prints, per method: the median step time, student slices per second (labeled plus
unlabeled slices per step over the median step time) and the peak GPU memory.

Usage (on a CUDA machine)::

    PRESET=paper DEVICE=cuda STEPS=60 python benchmarks/gpu_paper_throughput.py

Environment: ``PRESET`` (default ``paper``), ``DEVICE`` (default ``cuda``), ``STEPS``
(stage-2 steps per method, default 60), ``WORK`` (scratch folder, default /tmp/gpucheck).
"""

import json
import os
import time
from pathlib import Path

import torch

from cps4_engine.stage1 import Stage1Config, pretrain
from cps4_engine.stage2 import Stage2Config, train
from cps4_engine.synthetic import write_synthetic_dataset

WARM_UP_STEPS = 5


def main() -> None:
    preset = os.environ.get("PRESET", "paper")
    device = os.environ.get("DEVICE", "cuda")
    steps = int(os.environ.get("STEPS", "60"))
    root = Path(os.environ.get("WORK", "/tmp/gpucheck"))
    data = root / "synth12"
    write_synthetic_dataset(data, 12, 2026)
    began = time.time()
    pretrain(Stage1Config(data=data, out=root / "vlm", labeled=2, preset=preset, max_steps=10,
                          device=device, text_encoder="tiny", validation=1))
    print(f"stage-1 {preset} 10 steps: {time.time() - began:.1f} s", flush=True)
    for method in ("mean-teacher", "cps4"):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.time()
        out = root / f"stage2_{method}"
        train(Stage2Config(data=data, out=out, labeled=2, method=method,
                           vlm=root / "vlm" if method == "cps4" else None, preset=preset,
                           max_steps=steps, validation=1, validation_every=steps, device=device,
                           amp=True))
        history = json.loads((out / "history.json").read_text())
        step_times = sorted(entry["step_s"] for entry in history["steps"][WARM_UP_STEPS:])
        median = step_times[len(step_times) // 2]
        batch = json.loads((out / "config.json").read_text())["batch_size"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        print(f"stage-2 {preset} {method} AMP: {steps} steps in {time.time() - began:.1f} s, median "
              f"step {median * 1000:.1f} ms, student slices/s {2 * batch / median:.1f} (batch "
              f"{batch} labeled + {batch} unlabeled), peak GPU memory {peak:.2f} GiB, final losses "
              f"{history['steps'][-1]['losses']}", flush=True)


if __name__ == "__main__":
    main()
