"""Class maps from a trained stage-1 model: per-class probabilities, binary maps, prompt heat maps.

- :func:`load_vlm` rebuilds a stage-1 run's model (best weights) from its folder alone.
- :meth:`VLM.class_probabilities <cps4_engine.models.vlm.VLM.class_probabilities>` gives
  ``(S, 19, H, W)`` maps of preprocessed slices (what stage 2 consumes).
- :func:`volume_class_maps` gives, for a whole volume in its own voxel grid, each class's
  probability map and its binary map (probability above a threshold).
- :func:`prompt_heatmap` shows what any free-text prompt responds to: its share of each
  voxel's class attention (the same map the class maps are), and how much each of its
  tokens accounts for the voxels that match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cps4_engine.checkpoint import load_weights, read_run_config
from cps4_engine.errors import CPS4Error
from cps4_engine.io import Volume
from cps4_engine.models.image_encoder import build_image_encoder
from cps4_engine.models.text import load_text_architecture
from cps4_engine.models.vlm import CLASS_MAPS, VLM
from cps4_engine.preprocess import prepare_volume, restore_probabilities
from cps4_engine.presets import Preset

SCHEME_NAME = "mrspineseg"


@dataclass
class ClassMaps:
    """Per-class maps of one volume in its voxel grid.

    Attributes:
        probabilities: float32 ``(19, *shape)`` in [0, 1]; class ``c`` at channel ``c - 1``.
        binary: bool ``(19, *shape)``: probability above the threshold.
    """

    probabilities: np.ndarray
    binary: np.ndarray


@dataclass
class PromptHeatmap:
    """What a free-text prompt responds to in one volume.

    Attributes:
        heatmap: float32 ``(*shape)`` in [0, 1]: probability that each voxel matches the prompt.
        tokens: the prompt's tokens, special tokens included.
        token_attention: share of the prompt's total attention each token receives (sums to 1).
    """

    heatmap: np.ndarray
    tokens: list[str]
    token_attention: list[float]

    def word_attention(self) -> list[tuple[str, float]]:
        """The attention shares by whole word (:func:`word_attention`)."""
        return word_attention(self.tokens, self.token_attention)


def word_attention(tokens: list[str], shares: list[float]) -> list[tuple[str, float]]:
    """Attention shares by whole word: WordPiece continuations (``##ra``) are joined to the
    word before them and their shares summed (what the inspector and ``cps4
    inspect-prompt`` show)."""
    words: list[tuple[str, float]] = []
    for token, share in zip(tokens, shares):
        if token.startswith("##") and words:
            word, total = words[-1]
            words[-1] = (word + token[2:], total + share)
        else:
            words.append((token, share))
    return words


def load_vlm(run_dir: str | Path, device: str | torch.device = "cpu") -> VLM:
    """Rebuild a stage-1 run's best model, in eval mode, on ``device``.

    Raises:
        CPS4Error: the folder is not a stage-1 run, was trained for another scheme, or its
            weights are missing or do not fit the recorded architecture.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir, stage=1, scheme=SCHEME_NAME)
    try:
        preset = Preset.from_dict(config["preset"])
        prompts = list(config["prompts"])
        text_source = config["text_encoder"]["source"]
    except (KeyError, TypeError) as error:
        raise CPS4Error(f"stage-1 configuration lacks {error}", path=run_dir / "config.json") from None
    if config.get("class_maps") != CLASS_MAPS:
        raise CPS4Error(
            "this stage-1 run was saved before the class maps were read from the class attention "
            "(its maps came from a head the attention losses never trained); train stage 1 again",
            path=run_dir / "config.json",
        )
    text = load_text_architecture(run_dir / config["text_encoder"].get("folder", "text_encoder"), text_source, preset.embed_dim, preset.text_max_length)
    model = VLM(build_image_encoder(preset), text, prompts, preset, centre_prompts=bool(config.get("centre_prompts", False)))
    try:
        model.load_state_dict(load_weights(run_dir / "model.safetensors"))
    except RuntimeError as error:
        raise CPS4Error(f"weights do not fit the recorded model ({str(error).splitlines()[0]})", path=run_dir / "model.safetensors") from None
    return model.to(torch.device(device)).eval()


def volume_class_maps(vlm: VLM, volume: Volume, threshold: float = 0.5, batch_size: int = 16) -> ClassMaps:
    """Each class's probability and binary map for a whole volume, in its voxel grid.

    Args:
        vlm: a loaded stage-1 model.
        volume: the image volume ``(X, Y, Z)``.
        threshold: a voxel is in a class's binary map where its probability exceeds it.
        batch_size: slices per forward pass.
    """
    stack = prepare_volume(volume, vlm.slice_size, keep_aspect=vlm.preset.keep_aspect)
    probabilities = vlm.class_probabilities(torch.from_numpy(stack.images), batch_size=batch_size)
    restored = restore_probabilities(stack, probabilities)
    return ClassMaps(probabilities=restored, binary=restored > threshold)


def prompt_heatmap(vlm: VLM, volume: Volume, text: str, batch_size: int = 16) -> PromptHeatmap:
    """The heat map of a free-text prompt over a volume, in its voxel grid.

    Args:
        vlm: a loaded stage-1 model.
        volume: the image volume ``(X, Y, Z)``.
        text: any prompt, e.g. ``"L3 vertebra"``.
        batch_size: slices per forward pass.

    Raises:
        CPS4Error: the prompt is empty.
    """
    if not text.strip():
        raise CPS4Error("the prompt is empty; give a text such as 'L3 vertebra'")
    stack = prepare_volume(volume, vlm.slice_size, keep_aspect=vlm.preset.keep_aspect)
    heat, shares = vlm.prompt_response(torch.from_numpy(stack.images), text, batch_size=batch_size)
    restored = restore_probabilities(stack, heat[:, None])[0]
    tokens = vlm.text_encoder.token_strings(text)
    return PromptHeatmap(heatmap=restored, tokens=tokens, token_attention=[float(share) for share in shares])
