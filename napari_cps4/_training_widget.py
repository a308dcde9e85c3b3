"""Training widget: stage 1 (prompt pretraining) and stage 2 (semi-supervised segmentation).

The options mirror ``cps4 pretrain`` / ``cps4 train`` and their lists and defaults come
from :mod:`cps4_engine.options`: dataset, labeled volumes (a count such as ``2`` or a
fraction such as ``0.05``), steps (the preset's default until changed), size preset,
device (those this machine has), text encoder (stage 1; empty = the installed pretrained
MiniLM), method, stage-1 run and, for cps4, its semi-supervised base, pseudo-label source and
prompt weighting (stage 2; "auto" weighting lets the engine pick reliability when the stage-1
run recorded class_reliability.json, else global), output run folder.

*Start* first checks the split the run will draw (:func:`cps4_engine.data.plan_split`) and
warns, as viewer notifications, about what would teach less than expected (no validation
volumes, only partial masks); then it runs the trainer's event generator in a napari
thread worker: the viewer stays responsive, a napari progress bar and the dock's plot
follow the loss and validation Dice, and the status line says what the trainer does
before its first step (reading volumes, caching stage-1 maps). *Stop* sets the trainer's
cancel token; the trainer saves a checkpoint and the viewer stays usable; *Resume*
continues the run in the run folder from its last checkpoint. GPU memory is released at
the end. Errors appear as viewer notifications and in the status line, in the dock's
words (its field names, not the command line's options). After stage 2, the chosen
preview image is segmented and the prediction appears as a labels layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import napari
from napari.layers import Image, Labels
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cps4_engine.data import plan_split, split_warnings
from cps4_engine.errors import CPS4Error
from cps4_engine.events import CancelToken, TrainEvent
from cps4_engine.inference import Prediction
from cps4_engine.io import Volume
from cps4_engine.options import (
    BASES,
    DEFAULT_BASE,
    DEFAULT_LABELED,
    DEFAULT_METHOD,
    DEFAULT_PRESET,
    METHODS,
    PRESETS,
    PROMPT_WEIGHTINGS,
    PSEUDO_LABELS,
    WEIGHTED_PSEUDO_LABEL,
    default_steps,
    device_choices,
)
from cps4_engine.stage1 import Stage1Config
from cps4_engine.stage2 import Stage2Config, resolve_pseudo_label
from napari_cps4._view import prepare_viewer
from napari_cps4._common import LayerCombo, reports_errors, scrolling
from napari_cps4._layers import SOURCE_KEY, labels_layer_data, layer_affine
from napari_cps4._plot import DICE_COLOUR, LOSS_COLOUR, Axis, CurvePlot
from napari_cps4._workers import TrainingResult, training_events

STAGES = {"Stage 1 — prompt pretraining": 1, "Stage 2 — segmentation": 2}
LOSS_AXIS = "loss"
DICE_AXIS = "validation Dice"
# The prompt-weighting entry that leaves the choice to the engine (Stage2Config's None).
AUTO_WEIGHTING = "auto"
# The dock's field for each command-line option the engine's messages name.
OPTION_FIELDS = {
    "--labeled": "Labeled volumes",
    "--out": "Run folder",
    "--vlm": "Stage-1 run",
    "--max-steps": "Steps",
    "--preset": "Preset",
    "--device": "Device",
    "--method": "Method",
    "--base": "Base",
    "--pseudo-label": "Pseudo-labels",
    "--prompt-weighting": "Prompt weights",
    "--text-encoder": "Text encoder",
}


class TrainingWidget(QWidget):
    """Stage-1/stage-2 options, Start/Stop, progress and a live curve (see module docstring)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        prepare_viewer(napari_viewer)
        self.worker: GeneratorWorker | None = None
        self.cancel_token: CancelToken | None = None
        self.result: TrainingResult | None = None
        self.prediction_layer: Labels | None = None
        self._progress: progress | None = None
        self._stage = 1
        self._running_stage = 1
        self._steps_edited = False

        self.stage_combo = QComboBox()
        self.stage_combo.addItems(list(STAGES))
        self.stage_combo.currentTextChanged.connect(self._stage_changed)
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("dataset folder (any supported layout)")
        self.labeled_edit = QLineEdit(str(DEFAULT_LABELED))
        self.labeled_edit.setToolTip("labeled volumes: a count (2) or a fraction of the volumes (0.05)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PRESETS)
        self.preset_combo.setCurrentText(DEFAULT_PRESET)
        self.preset_combo.currentTextChanged.connect(self._show_default_steps)
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.text_encoder_edit = QLineEdit()
        self.text_encoder_edit.setPlaceholderText("default: pretrained MiniLM; 'tiny'; a folder or hub id")
        self.fine_tune_text_check = QCheckBox("Fine-tune the text encoder")
        self.fine_tune_text_check.setToolTip(
            "off (default): the text backbone stays fixed and only its projection trains, "
            "which was better and several times faster in our benchmarks"
        )
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setCurrentText(DEFAULT_METHOD)
        self.base_combo = QComboBox()
        self.base_combo.addItems(BASES)
        self.base_combo.setCurrentText(DEFAULT_BASE)
        self.base_combo.setToolTip("the semi-supervised method cps4 trains its fused pseudo-labels with")
        self.pseudo_label_combo = QComboBox()
        self.pseudo_label_combo.addItems(PSEUDO_LABELS)
        self.pseudo_label_combo.setCurrentText(resolve_pseudo_label("cps4", None))
        self.pseudo_label_combo.setToolTip("cps4 pseudo-labels from the teacher, the class-prompt maps, or both fused")
        self.prompt_weighting_combo = QComboBox()
        self.prompt_weighting_combo.addItems([AUTO_WEIGHTING, *PROMPT_WEIGHTINGS])
        self.prompt_weighting_combo.setToolTip(
            "each class map's weight in fused pseudo-labels: global (one weight for all) or reliability "
            "(scaled by the map's stage-1 validation Dice); auto: reliability when the stage-1 run "
            "recorded class_reliability.json, else global"
        )
        self.vlm_edit = QLineEdit()
        self.vlm_edit.setPlaceholderText("stage-1 run folder (for cps4)")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("output run folder")
        self.preview_combo = LayerCombo(napari_viewer, Image)

        form = QFormLayout()
        form.addRow("Stage", self.stage_combo)
        form.addRow("Dataset", self.data_edit)
        form.addRow("Labeled volumes", self.labeled_edit)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Device", self.device_combo)
        self.text_encoder_label = QLabel("Text encoder")
        form.addRow(self.text_encoder_label, self.text_encoder_edit)
        form.addRow("", self.fine_tune_text_check)
        self.method_label = QLabel("Method")
        form.addRow(self.method_label, self.method_combo)
        self.vlm_label = QLabel("Stage-1 run")
        form.addRow(self.vlm_label, self.vlm_edit)
        self.base_label = QLabel("Base")
        form.addRow(self.base_label, self.base_combo)
        self.pseudo_label_label = QLabel("Pseudo-labels")
        form.addRow(self.pseudo_label_label, self.pseudo_label_combo)
        self.prompt_weighting_label = QLabel("Prompt weights")
        form.addRow(self.prompt_weighting_label, self.prompt_weighting_combo)
        form.addRow("Run folder", self.out_edit)
        self.preview_label = QLabel("Predict image")
        form.addRow(self.preview_label, self.preview_combo)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(reports_errors(self.start))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(reports_errors(self.stop))
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("continue the run in the run folder from its last checkpoint")
        self.resume_button.clicked.connect(reports_errors(lambda: self.start(resume=True)))
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.resume_button)
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)
        self.plot = CurvePlot(
            "step", Axis(LOSS_AXIS, LOSS_COLOUR), Axis(DICE_AXIS, DICE_COLOUR, limits=(0.0, 1.0), markers=True)
        )

        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addWidget(self.plot)
        layout.addStretch(1)
        scrolling(self, content)
        self.steps_spin.valueChanged.connect(self._steps_changed_by_user)
        self.method_combo.currentTextChanged.connect(self._show_applicable_options)
        self.pseudo_label_combo.currentTextChanged.connect(self._show_applicable_options)
        self._stage_changed(self.stage_combo.currentText())

    # public API (used by the buttons and by tests) ----------------------------------------

    def build_config(self, resume: bool = False) -> Stage1Config | Stage2Config:
        """The trainer configuration for the chosen stage, from the widget's fields.

        Args:
            resume: continue the run in the run folder instead of starting a new one.

        Raises:
            CPS4Error: a required field is empty or malformed.
        """
        data = _required_path(self.data_edit, "dataset")
        out = _required_path(self.out_edit, "run folder")
        labeled = parse_labeled(self.labeled_edit.text())
        common = {
            "data": data,
            "labeled": labeled,
            "out": out,
            "preset": self.preset_combo.currentText(),
            "max_steps": self.steps_spin.value(),
            "device": self.device_combo.currentText(),
            "resume": resume,
        }
        if self._stage == 1:
            return Stage1Config(
                text_encoder=self.text_encoder_edit.text().strip() or None,
                freeze_text_encoder=not self.fine_tune_text_check.isChecked(),
                **common,
            )
        method = self.method_combo.currentText()
        vlm_text = self.vlm_edit.text().strip()
        if method == "cps4" and not vlm_text:
            raise CPS4Error("method cps4 needs a stage-1 run folder (train stage 1 first)")
        if method != "cps4":
            return Stage2Config(method=method, **common)
        pseudo_label = self.pseudo_label_combo.currentText()
        weighting = self.prompt_weighting_combo.currentText()
        if weighting == AUTO_WEIGHTING or pseudo_label != WEIGHTED_PSEUDO_LABEL:
            weighting = None
        return Stage2Config(
            method=method, vlm=Path(vlm_text), base=self.base_combo.currentText(), pseudo_label=pseudo_label,
            prompt_weighting=weighting, **common,
        )

    def start(self, resume: bool = False) -> GeneratorWorker:
        """Start (or, with ``resume``, continue) training the chosen stage in a thread worker.

        Returns:
            The worker.

        Raises:
            CPS4Error: a run is already going, the options are incomplete, or the split
                they ask for cannot be drawn (in the dock's words).
        """
        if self.worker is not None:
            raise CPS4Error("a training run is already going; press Stop first")
        try:
            config = self.build_config(resume)
            if not resume:
                split = plan_split(config.data, config.labeled, config.seed, config.train_cases, config.validation)
                for warning in split_warnings(split):
                    show_warning(f"CPS4 training: {warning}")
        except CPS4Error as error:
            message = in_dock_words(str(error))
            self.status_label.setText(f"not started: {message}")
            raise CPS4Error(message) from None
        preview = self._preview_volume() if self._stage == 2 else None
        self.cancel_token = CancelToken()
        self.result = None
        self._running_stage = self._stage
        stage_name = self.stage_combo.currentText()
        self.plot.reset(stage_name)
        self._progress = progress(total=config.max_steps, desc=f"CPS4 {stage_name}")
        worker = create_worker(
            training_events, self._stage, config, self.cancel_token, preview,
            _start_thread=False, _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.start_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.status_label.setText(f"{stage_name}: {self._preparation(config)}…")
        worker.start()
        return worker

    def stop(self) -> None:
        """Ask the running trainer to save a checkpoint and stop at its next step.

        Raises:
            CPS4Error: no run is going.
        """
        if self.worker is None or self.cancel_token is None:
            raise CPS4Error("no training run is going")
        self.cancel_token.cancel()
        self.status_label.setText("stopping after this step (a checkpoint is saved; Resume continues)…")

    # worker signals ----------------------------------------------------------------------

    def _on_event(self, event: TrainEvent) -> None:
        if event.kind == "step":
            if "total" in event.losses:
                self.plot.add(LOSS_AXIS, event.step, event.losses["total"])
            if self._progress is not None:
                self._progress.update(event.step - self._progress.n)
            eta = f", about {event.eta_s:.0f} s left" if event.eta_s is not None else ""
            loss = event.losses.get("total")
            loss_text = f", loss {loss:.4f}" if loss is not None else ""
            self.status_label.setText(f"step {event.step}/{event.max_steps}{loss_text}{eta}")
        elif event.kind == "validation" and "dice" in event.metrics:
            self.plot.add(DICE_AXIS, event.step, event.metrics["dice"])
        elif event.message:
            self.status_label.setText(in_dock_words(event.message))

    def _on_returned(self, result: TrainingResult) -> None:
        self.result = result
        stopped = result.last_event is not None and result.last_event.kind == "cancelled"
        where = f" in {result.run_dir}"
        self.status_label.setText(("stopped; checkpoint saved (Resume continues)" if stopped else "finished") + where)
        if self._running_stage == 1:
            self.vlm_edit.setText(str(result.run_dir))
        if result.prediction is not None:
            self._show_prediction(result.prediction)
        show_info(f"CPS4 training {'stopped' if stopped else 'finished'}{where}")

    def _on_error(self, error: Exception) -> None:
        # A worker with its own errored handler does not notify the viewer; say it here.
        message = in_dock_words(str(error))
        self.status_label.setText(f"failed: {message}")
        show_error(f"CPS4 training failed: {message}")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        self.cancel_token = None
        self.start_button.setEnabled(True)
        self.resume_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    # internals ---------------------------------------------------------------------------

    def _preview_volume(self) -> Volume | None:
        layer = self.preview_combo.layer()
        if layer is None:
            return None
        return Volume(layer.data, layer_affine(layer), layer.metadata.get(SOURCE_KEY))

    def _show_prediction(self, prediction: Prediction) -> None:
        image_layer = self.preview_combo.layer()
        if image_layer is None:
            return
        name = f"{image_layer.name} prediction"
        data, attributes, _ = labels_layer_data(prediction.labels, layer_affine(image_layer), None, name)
        attributes["scale"] = tuple(image_layer.scale)
        attributes["translate"] = tuple(image_layer.translate)
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.prediction_layer = self.viewer.add_labels(data, **attributes)

    def _preparation(self, config: Stage1Config | Stage2Config) -> str:
        """What the trainer does before its first event, which can take a while."""
        if isinstance(config, Stage2Config) and config.method == "cps4":
            return "reading the volumes and caching the stage-1 maps"
        return "reading and preparing the volumes"

    def _steps_changed_by_user(self, _value: int) -> None:
        self._steps_edited = True

    def _show_default_steps(self) -> None:
        """Show the preset's default steps for the stage, unless the user typed a number."""
        if not self._steps_edited:
            self.steps_spin.blockSignals(True)
            self.steps_spin.setValue(default_steps(self.preset_combo.currentText(), self._stage))
            self.steps_spin.blockSignals(False)

    def _stage_changed(self, text: str) -> None:
        self._stage = STAGES[text]
        self._show_default_steps()
        for widget in (self.text_encoder_label, self.text_encoder_edit, self.fine_tune_text_check):
            widget.setVisible(self._stage == 1)
        for widget in (self.method_label, self.method_combo, self.preview_label, self.preview_combo):
            widget.setVisible(self._stage == 2)
        self._show_applicable_options()

    def _show_applicable_options(self) -> None:
        """Show the stage-1 run, base, pseudo-label and weighting fields for stage-2 cps4 only;
        the weighting is enabled only for fused pseudo-labels, the only ones it weighs."""
        cps4 = self._stage == 2 and self.method_combo.currentText() == "cps4"
        for widget in (self.vlm_label, self.vlm_edit, self.base_label, self.base_combo,
                       self.pseudo_label_label, self.pseudo_label_combo,
                       self.prompt_weighting_label, self.prompt_weighting_combo):
            widget.setVisible(cps4)
        fused = self.pseudo_label_combo.currentText() == WEIGHTED_PSEUDO_LABEL
        self.prompt_weighting_label.setEnabled(fused)
        self.prompt_weighting_combo.setEnabled(fused)


def in_dock_words(message: str) -> str:
    """An engine message with the command line's options named as the dock's fields.

    ``--labeled 2 asks for …`` -> ``'Labeled volumes' 2 asks for …``; "pass --resume" and
    "resume with --resume" become "press Resume".
    """
    message = re.sub(r"(pass|resume with) --resume", "press Resume", message)
    def field(match: re.Match[str]) -> str:
        option = match.group(0)
        return f"'{OPTION_FIELDS[option]}'" if option in OPTION_FIELDS else option

    return re.sub(r"--[a-z][a-z-]*", field, message)


def parse_labeled(text: str) -> int | float:
    """``"2"`` → 2 volumes, ``"0.05"`` → 5 % of the volumes.

    Raises:
        CPS4Error: not a positive count or a fraction in (0, 1].
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise CPS4Error(f"labeled volumes {text!r} is neither a count nor a fraction") from None
    if value <= 0:
        raise CPS4Error(f"labeled volumes must be positive, got {text!r}")
    if value.is_integer() and "." not in text:
        return int(value)
    if value > 1:
        raise CPS4Error(f"labeled fraction {text!r} must be at most 1")
    return value


def _required_path(edit: QLineEdit, what: str) -> Path:
    text = edit.text().strip()
    if not text:
        raise CPS4Error(f"choose a {what} first")
    return Path(text)
