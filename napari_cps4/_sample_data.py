"""Sample data: a synthetic sagittal T2-like spine volume with its labels.

The phantom comes from :func:`cps4_engine.synthetic.sample_volume` (deterministic by
seed), so the sample opens instantly and offline. Both layers carry the phantom's affine,
so painted labels can be saved in its geometry; the image opens sagittal, superior up
(:func:`napari_cps4._view.prepare_viewer`).
"""

from __future__ import annotations

import napari

from cps4_engine.io import Volume
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.synthetic import sample_volume
from napari_cps4._layers import LayerDataTuple, image_layer_data, labels_layer_data
from napari_cps4._view import prepare_viewer

SAMPLE_NAME = "synthetic spine"


def sample_spine(seed: int = 0) -> list[LayerDataTuple]:
    """The synthetic spine image layer and its ground-truth labels layer.

    Args:
        seed: phantom seed; each seed is a different, reproducible case.
    """
    image, label, affine = sample_volume(seed=seed)
    image_tuple = image_layer_data(Volume(image, affine, None), name=SAMPLE_NAME)
    labels_tuple = labels_layer_data(label, affine, None, f"{SAMPLE_NAME} labels", mrspineseg_scheme())
    prepare_viewer(napari.current_viewer())
    return [image_tuple, labels_tuple]
