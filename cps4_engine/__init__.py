"""cps4_engine: the Qt-free core of napari-cps4 (data, models, training, inference)."""

__version__ = "0.1.0"
