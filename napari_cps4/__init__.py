"""napari-cps4: the napari face of the CPS4 engine.

The npe2 manifest (``napari.yaml``) declares a NIfTI reader and writers, the synthetic
spine sample and four dock widgets (data and labeling, training, per-class review,
prompt inspector). Every computation is delegated to :mod:`cps4_engine`; these modules
only turn its results into layers, tables, progress and plots.
"""

__version__ = "0.1.0"
