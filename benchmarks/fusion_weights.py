"""Pseudo-label Dice of teacher, class maps and fused labels at several prompt weights.

For a finished CPS4 stage-2 run and its stage-1 run, the run's final EMA teacher and the
stage-1 class maps label the split's validation volumes and its unlabeled training volumes;
the fused labels (:func:`cps4_engine.fusion.combine_with_teacher`) are formed at the
weights the run recorded and at uniform weights 0.5, 0.75 and 1.0. Mean Dice per volume
group, without the level step. The validation rows are the ones to choose a weight by.

    python benchmarks/fusion_weights.py STAGE2RUN STAGE1RUN
"""
import sys
from pathlib import Path
import numpy as np, torch
from cps4_engine.checkpoint import load_weights, read_run_config
from cps4_engine.data import Split
from cps4_engine.fusion import combine_with_teacher
from cps4_engine.io import read_volume
from cps4_engine.metrics import case_metrics
from cps4_engine.models.segmenter import build_segmenter
from cps4_engine.preprocess import prepare_volume, restore_labels, with_context
from cps4_engine.inference import predict_slices
from cps4_engine.stage2 import compute_prompt_cache
from cps4_engine import classmaps

torch.set_num_threads(1)
run, vlm_run = Path(sys.argv[1]), Path(sys.argv[2])
config = read_run_config(run, stage=2, scheme="mrspineseg")
teacher = build_segmenter(config["segmenter"]); teacher.load_state_dict(load_weights(run / "teacher.safetensors", "cpu")); teacher.eval()
vlm = classmaps.load_vlm(vlm_run, torch.device("cpu"))
size = tuple(config["segmenter"]["slice_size"]); threshold = float(config["settings"]["prompt_threshold"])
recorded = config.get("prompt_weights")
print("recorded weights (lumbar):", [round(w, 3) for w in recorded] if recorded else None)
split = Split.load(run / "split.json")
weights = {"rec": torch.tensor(recorded, dtype=torch.float32) if recorded else 0.25, "0.5": 0.5, "0.75": 0.75, "1.0": 1.0}
for group, cases in (("validation", split.validation), ("unlabeled", split.unlabeled)):
    scores = {k: [] for k in ["teacher", "prompt", *("fused@" + w for w in weights)]}
    for case in cases:
        volume = read_volume(case.image_path, kind="image"); truth = read_volume(case.label_path, kind="label")
        stack = prepare_volume(volume, size, keep_aspect=bool(config["segmenter"].get("keep_aspect", False)))
        images = torch.from_numpy(stack.images)
        tp = predict_slices(teacher, with_context(images, int(config["segmenter"].get("context_slices", 0))), batch_size=16)
        pp = compute_prompt_cache(vlm, images, torch.device("cpu")).float()
        for key in scores:
            mode, _, w = key.partition("@")
            combined = combine_with_teacher(tp, pp, mode=mode, threshold=threshold, prompt_weight=weights.get(w, 0.25), class_dim=1)
            scores[key].append(case_metrics(restore_labels(stack, combined.labels), truth.array, truth.spacing).mean_dice)
    print(group, len(cases), {k: round(float(np.nanmean(v)), 4) for k, v in scores.items()}, flush=True)
