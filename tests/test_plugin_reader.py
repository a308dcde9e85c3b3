"""``viewer.open(path)`` on a NIfTI uses the plugin's reader once the plugin has been used.

napari runs no plugin code before a plugin's first command (npe2 activates it then), and
with two readers for ``*.nii.gz`` (this plugin's and napari's builtins, through imageio)
and no preference, ``viewer.open`` raises and File > Open asks. The plugin therefore
records itself as the reader of ``*.nii``/``*.nii.gz`` in napari's settings
(``plugins.extension2reader``, which napari saves) on activation and whenever one of its
docks, its sample or its reader meets a viewer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cps4_engine.io import sagittal_layout, write_volume
from cps4_engine.synthetic import sample_volume
from napari_cps4._layers import AFFINE_KEY

pytestmark = pytest.mark.viewer


@pytest.mark.parametrize("dock", ["Training", "Data and labeling"])
def test_bare_viewer_open_after_a_dock_opened_is_sagittal_superior_up(make_napari_viewer, tmp_path: Path, dock) -> None:
    from napari.settings import get_settings

    image, _label, affine = sample_volume(seed=2)
    path = write_volume(tmp_path / "Case1.nii.gz", image, affine)
    viewer = make_napari_viewer()  # fresh settings: no reader preference yet
    assert "*.nii.gz" not in get_settings().plugins.extension2reader
    viewer.window.add_plugin_dock_widget("napari-cps4", dock)
    assert get_settings().plugins.extension2reader["*.nii.gz"] == "napari-cps4"

    [layer] = viewer.open(str(path))  # no plugin named, as a script or File > Open does
    layout = sagittal_layout(affine)
    assert layer.metadata[AFFINE_KEY].tolist() == affine.tolist()
    assert viewer.dims.not_displayed == (layout.axes[0],)
    assert viewer.dims.order[-2:] == layout.axes[1:], "rows superior-inferior, columns anterior-posterior"
    assert viewer.camera.orientation2d[0] == ("up" if layout.flip_rows else "down"), "superior up"
