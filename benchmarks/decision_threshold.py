"""Would a decision threshold chosen on the validation volumes fix under-segmentation?

For a finished stage-2 run on the vb3 dev protocol: the class probabilities of its 2
validation volumes and of the 6 test volumes (the last 6 in index order), the background
probability scaled by s before the argmax, then the 3D level step; prints Dice per volume
and scale, the mean per group, and the predicted/true foreground volume ratio at s = 1.

    python benchmarks/decision_threshold.py RUN
"""
import json, sys
from pathlib import Path
import numpy as np
from cps4_engine.inference import load_segmenter, predict_volume
from cps4_engine.io import read_volume
from cps4_engine.levels import make_levels_consistent
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.metrics import case_metrics, summarize

run = Path(sys.argv[1])
split = json.loads((run / "split.json").read_text())
from cps4_engine.bench import find_realdata
from cps4_engine.data import open_dataset
realdata = find_realdata(None)
if realdata is None:
    raise SystemExit("decision_threshold.py: no real data (../shared/realdata or $CPS4_REALDATA)")
test = [dict(case_id=str(c.case_id), image=str(c.image_path), label=str(c.label_path))
        for c in list(open_dataset(realdata / "vb3_l1l5_t1").cases)[14:]]
groups = {"validation": split["validation"], "test": test}
scales = [1.0, 0.8, 0.6, 0.45, 0.3, 0.2]
model = load_segmenter(run, "cpu")
out = {}
for name, cases in groups.items():
    per_scale = {s: [] for s in scales}
    ratios = []
    for case in cases:
        image = read_volume(case["image"], kind="image")
        truth = read_volume(case["label"], kind="label")
        pred = predict_volume(model, image, keep_probabilities=True, level_step=False)
        probs = pred.probabilities
        for s in scales:
            scaled = probs.copy(); scaled[0] *= s
            labels = scaled.argmax(0).astype(np.uint8)
            labels, _ = make_levels_consistent(labels, image.affine, mrspineseg_scheme())
            m = case_metrics(labels, truth.array, truth.spacing, case_id=case["case_id"])
            per_scale[s].append(m)
            if s == 1.0:
                ratios.append(float((labels > 0).sum() / max(1, (truth.array > 0).sum())))
        print(name, case["case_id"], "fg volume ratio pred/true", round(ratios[-1], 3),
              " ".join(f"{s}:{per_scale[s][-1].mean_dice:.3f}" for s in scales), flush=True)
    out[name] = {s: summarize(v).mean_dice for s, v in per_scale.items()}
    print(name, {s: round(d, 4) for s, d in out[name].items()}, "mean fg ratio", round(float(np.mean(ratios)), 3), flush=True)
