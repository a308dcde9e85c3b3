"""The stage-1 vision-language model: image encoder, text encoder, prompt-pixel head and
pixel-over-token cross-attention.

Prompts: one per class of the scheme, background first (P = 20 for MRSpineSeg): prompt
``p`` describes class ``p``. The background prompt gives the cross-attention somewhere to
send background pixels and the alignment loss a negative anchor; stage 2 and the class
maps use only the 19 foreground channels (class ``c`` at channel ``c - 1``).

- :class:`PromptPixelHead`: ``logit = scale * cos(pixel, prompt) + bias`` with a learnable
  scale and bias; ``sigmoid(logit)`` is the probability that the pixel belongs to the
  prompt's class.
- Prompt centring (on by default): the class prompts of a scheme differ in one word ("L3"
  against "L4"), so their pooled embeddings share a large common component (projected
  pooled MiniLM embeddings of the 20 prompts have a mean pairwise cosine of 0.83, up to
  0.99; ``benchmarks/stage1_diagnostics.py prompts``). The heads
  therefore see each pooled embedding minus the mean over the class prompts; a free-text
  prompt has the same class mean subtracted, so it is compared in the same frame.
- :class:`TokenCrossAttention`: every pixel (query) attends over every token (key) of
  every prompt; the softmax runs over all tokens of all prompts, so each pixel splits one
  unit of attention between the prompts. Summing a prompt's token attention gives that
  class's attention map, which the token- and pixel-level losses compare with its mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cps4_engine.models.text import TextEncoder, TextEncoding
from cps4_engine.presets import Preset

INITIAL_SCALE = 10.0
INITIAL_BIAS = -5.0


@dataclass
class VLMOutput:
    """What one forward pass of :class:`VLM` gives.

    Attributes:
        logits: float ``(B, P, H, W)``: prompt-pixel logits; ``sigmoid`` gives probabilities.
        attention: float ``(B, P, L, h, w)``: attention of each pixel on each token of
            each prompt, at the attention resolution ``(h, w) = (H, W) / stride``; sums to
            1 over ``(P, L)`` at every pixel, 0 on padding tokens.
        image_logits: float ``(B, P)``: logits of the whole-slice embedding against each
            prompt (for the image-text contrastive term).
        pixel_embeddings: float ``(B, D, H, W)``.
        prompt_embeddings: float ``(P, D)``: the pooled prompt embeddings the heads saw
            (centred when the model centres prompts).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    image_logits: torch.Tensor
    pixel_embeddings: torch.Tensor
    prompt_embeddings: torch.Tensor

    @property
    def class_attention(self) -> torch.Tensor:
        """Each prompt's attention summed over its tokens, ``(B, P, h, w)`` in [0, 1]."""
        return self.attention.sum(dim=2)


class PromptPixelHead(nn.Module):
    """Cosine similarity of embeddings with prompt embeddings, scaled and shifted.

    Args:
        initial_scale: starting value of the (positive, learnable) scale.
        initial_bias: starting value of the learnable bias; negative so that, before
            training, no class claims a pixel.
    """

    def __init__(self, initial_scale: float = INITIAL_SCALE, initial_bias: float = INITIAL_BIAS) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial_scale)))
        self.bias = nn.Parameter(torch.tensor(float(initial_bias)))

    def forward(self, embeddings: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Logits of ``embeddings (B, D, *spatial)`` against ``prompts (P, D)``: ``(B, P, *spatial)``."""
        cosine = torch.einsum("bd...,pd->bp...", F.normalize(embeddings, dim=1), F.normalize(prompts, dim=-1))
        return self.log_scale.exp() * cosine + self.bias


class TokenCrossAttention(nn.Module):
    """Attention weights of pixels (queries) over the tokens of all prompts (keys).

    Args:
        embed_dim: width D of pixel and token embeddings.
        attention_dim: width of queries and keys.
        stride: pixel embeddings are average-pooled by this factor first.
    """

    def __init__(self, embed_dim: int, attention_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.query = nn.Conv2d(embed_dim, attention_dim, kernel_size=1)
        self.key = nn.Linear(embed_dim, attention_dim)
        self.stride = int(stride)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Attention ``(B, P, L, h, w)`` of pixel embeddings ``(B, D, H, W)`` over prompt
        tokens ``(P, L, D)`` with mask ``(P, L)`` (True for real tokens)."""
        if self.stride > 1:
            pixels = F.avg_pool2d(pixels, self.stride)
        batch, _, height, width = pixels.shape
        prompts, length, _ = tokens.shape
        queries = self.query(pixels).flatten(2)
        keys = self.key(tokens).reshape(prompts * length, -1)
        scores = torch.einsum("ban,ka->bnk", queries, keys) / math.sqrt(keys.shape[-1])
        scores = scores.masked_fill(~token_mask.reshape(1, 1, -1), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        return weights.reshape(batch, height, width, prompts, length).permute(0, 3, 4, 1, 2)


class VLM(nn.Module):
    """Image encoder + text encoder + prompt-pixel head + token cross-attention.

    Args:
        image_encoder: maps ``(B, 1, H, W)`` to ``(B, D, H, W)``.
        text_encoder: projects to the same D.
        prompts: one prompt per class, background first (class ``p`` at index ``p``).
        preset: the preset the model was built for (slice size, attention sizes).
        centre_prompts: subtract the class prompts' mean pooled embedding before the
            heads (see the module docstring); runs saved before this option existed
            were trained without it.
    """

    def __init__(
        self, image_encoder: nn.Module, text_encoder: TextEncoder, prompts: Sequence[str], preset: Preset, centre_prompts: bool = True
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.head = PromptPixelHead()
        self.image_head = PromptPixelHead()
        self.attention = TokenCrossAttention(preset.embed_dim, preset.attention_dim, preset.attention_stride)
        self.prompts = list(prompts)
        self.preset = preset
        self.centre_prompts = bool(centre_prompts)

    @property
    def slice_size(self) -> tuple[int, int]:
        """``(H, W)`` of the slices the model was trained on."""
        return tuple(self.preset.slice_size)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return self.head.bias.device

    def encode_prompts(self, texts: Sequence[str] | None = None) -> TextEncoding:
        """Encode ``texts`` (default: the class prompts)."""
        return self.text_encoder.encode(list(self.prompts if texts is None else texts))

    def head_prompts(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings ``(P', D)`` as the heads see them.

        ``pooled`` starts with the class prompts (``len(self.prompts)`` rows); any rows
        after them (free text) are shifted by the same class mean.
        """
        if not self.centre_prompts:
            return pooled
        return pooled - pooled[: len(self.prompts)].mean(dim=0, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: TextEncoding | None = None) -> VLMOutput:
        """Run the model on slices ``(B, 1, H, W)`` against ``prompts`` (default: the class
        prompts; otherwise the class prompts followed by any others)."""
        encoded = self.encode_prompts() if prompts is None else prompts
        pooled = self.head_prompts(encoded.pooled)
        pixels = self.image_encoder(images)
        return VLMOutput(
            logits=self.head(pixels, pooled),
            attention=self.attention(pixels, encoded.tokens, encoded.mask),
            image_logits=self.image_head(pixels.mean(dim=(2, 3)), pooled),
            pixel_embeddings=pixels,
            prompt_embeddings=pooled,
        )

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Per-class probability maps of preprocessed slices.

        Args:
            images: float ``(S, 1, H, W)`` in [0, 1], on any device.
            batch_size: slices per forward pass.

        Returns:
            float32 ``(S, 19, H, W)`` on the device of ``images``; foreground class ``c``
            at channel ``c - 1``.
        """
        was_training = self.training
        self.eval()
        pooled = self.head_prompts(self.encode_prompts().pooled)
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device, dtype=torch.float32)
            logits = self.head(self.image_encoder(batch), pooled)
            chunks.append(logits[:, 1:].float().sigmoid().to(images.device))
        self.train(was_training)
        return torch.cat(chunks) if chunks else images.new_zeros((0, len(self.prompts) - 1, *images.shape[2:]))

    @torch.no_grad()
    def prompt_response(self, images: torch.Tensor, text: str, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """How slices respond to a free-text prompt.

        The prompt is added after the class prompts, so in the cross-attention it competes
        with them for every pixel's attention.

        Args:
            images: float ``(S, 1, H, W)`` in [0, 1].
            text: any text.
            batch_size: slices per forward pass.

        Returns:
            ``(probabilities, token_attention)``: float32 ``(S, H, W)`` probability that
            each pixel matches the prompt, on the device of ``images``; float32 ``(T,)``
            share of the prompt's total attention received by each of its T tokens.
        """
        was_training = self.training
        self.eval()
        encoded = self.encode_prompts([*self.prompts, text])
        count = int(encoded.mask[-1].sum())
        maps, token_mass = [], torch.zeros(encoded.tokens.shape[1], device=self.device)
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device, dtype=torch.float32)
            output = self(batch, encoded)
            maps.append(output.logits[:, -1].float().sigmoid().to(images.device))
            token_mass += output.attention[:, -1].float().sum(dim=(0, 2, 3))
        self.train(was_training)
        shares = token_mass[:count] / token_mass[:count].sum().clamp_min(torch.finfo(torch.float32).tiny)
        return torch.cat(maps), shares.cpu()
