"""The stage-1 vision-language model: image encoder, text encoder and one prompt-pixel map.

Prompts: one per class of the scheme, background first (P = 20 for MRSpineSeg): prompt
``p`` describes class ``p``. The background prompt gives every pixel somewhere to go and
the losses a negative anchor; stage 2 and the class maps use only the 19 foreground
channels (class ``c`` at channel ``c - 1``).

One prompt-pixel map. :class:`PromptPixelHead` gives ``logit = scale * cos(pixel,
prompt) + bias`` for every pixel and prompt. Everything reads these logits:

- the **class attention** ``softmax over the P prompts of the logits`` is how each pixel
  splits one unit of attention between the prompts; the token- and pixel-level attention
  losses compare it with the masks, and it *is* the class maps stage 2 fuses and the
  prompt inspector shows (:meth:`VLM.class_probabilities`);
- the dense alignment loss reads ``sigmoid(logit)`` of the same logits (per class).

So every stage-1 loss shapes the map stage 2 receives: switching the attention losses
off changes the maps. (Before, a separate pixel-over-token cross-attention carried the
attention losses and the maps were read from the head, so the losses never reached
them.) The bias cancels in the softmax; the learnable scale is its inverse temperature.

Prompt centring (on by default): the class prompts of a scheme differ in a few words, so
their pooled embeddings share a large common component (``benchmarks/stage1_diagnostics.py
prompts``). The head therefore sees each pooled embedding minus the mean over the class
prompts; a free-text prompt has the same class mean subtracted, so it is compared in the
same frame.

Which words of a prompt matter (:meth:`VLM.prompt_response`): the pixels that match a
free-text prompt are compared with each of its token embeddings; a token's share is the
softmax over the prompt's tokens of the same scaled cosine, averaged over the pixels
weighted by how much they match.
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

# What a stage-1 run's config.json records under "class_maps": where its maps come from.
CLASS_MAPS = "class-attention"
INITIAL_SCALE = 10.0
INITIAL_BIAS = -5.0
# F.normalize's floor on a norm: a zero embedding has cosine 0 with every prompt.
_NORM_FLOOR = 1e-12


@dataclass
class VLMOutput:
    """What one forward pass of :class:`VLM` gives.

    Attributes:
        logits: float ``(B, P, H, W)``: prompt-pixel logits; ``sigmoid`` gives each
            class's own probability (the alignment loss).
        image_logits: float ``(B, P)``: logits of the whole-slice embedding against each
            prompt (for the image-text contrastive term); None when not asked for.
        pixel_embeddings: float ``(B, D, H, W)``.
        prompt_embeddings: float ``(P, D)``: the pooled prompt embeddings the heads saw
            (centred when the model centres prompts).
    """

    logits: torch.Tensor
    image_logits: torch.Tensor | None
    pixel_embeddings: torch.Tensor
    prompt_embeddings: torch.Tensor

    @property
    def class_attention(self) -> torch.Tensor:
        """How each pixel splits its attention between the prompts: float ``(B, P, H, W)``,
        the softmax of :attr:`logits` over prompts (sums to 1 at every pixel). The class
        maps stage 2 uses are its foreground channels."""
        return class_attention(self.logits)


def class_attention(logits: torch.Tensor, prompt_dim: int = 1) -> torch.Tensor:
    """Softmax of prompt-pixel logits over the prompts (float32 for stability)."""
    return torch.softmax(logits.float(), dim=prompt_dim)


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
        directions = F.normalize(prompts, dim=-1)
        # The P dot products are divided by the pixel norms rather than the D channels
        # normalised first (one full-size pass fewer, and its backward), and a slice map
        # goes through a 1 x 1 convolution, which needs no channel-last copy as einsum
        # does: 2.5 x faster forward and backward on a `cpu`-preset batch, same values.
        if embeddings.dim() == 4:
            dots = F.conv2d(embeddings, directions[:, :, None, None])
        else:
            dots = torch.einsum("bd...,pd->bp...", embeddings, directions)
        norms = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True).clamp_min(_NORM_FLOOR)
        return self.log_scale.exp() * (dots / norms) + self.bias


class VLM(nn.Module):
    """Image encoder + text encoder + the prompt-pixel head.

    Args:
        image_encoder: maps ``(B, 1, H, W)`` to ``(B, D, H, W)``.
        text_encoder: projects to the same D.
        prompts: one prompt per class, background first (class ``p`` at index ``p``).
        preset: the preset the model was built for (slice size, embedding width).
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

    def forward(
        self, images: torch.Tensor, prompts: TextEncoding | None = None, with_image_logits: bool = True
    ) -> VLMOutput:
        """Run the model on slices ``(B, 1, H, W)`` against ``prompts`` (default: the class
        prompts; otherwise the class prompts followed by any others).

        ``with_image_logits=False`` leaves :attr:`VLMOutput.image_logits` None: a training
        step whose loss does not read them must not compute them, or DDP waits for
        gradients of the image head that never come.
        """
        encoded = self.encode_prompts() if prompts is None else prompts
        pooled = self.head_prompts(encoded.pooled)
        pixels = self.image_encoder(images)
        return VLMOutput(
            logits=self.head(pixels, pooled),
            image_logits=self.image_head(pixels.mean(dim=(2, 3)), pooled) if with_image_logits else None,
            pixel_embeddings=pixels,
            prompt_embeddings=pooled,
        )

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """The class maps of preprocessed slices: the foreground channels of the class
        attention (:attr:`VLMOutput.class_attention`).

        Args:
            images: float ``(S, 1, H, W)`` in [0, 1], on any device.
            batch_size: slices per forward pass.

        Returns:
            float32 ``(S, 19, H, W)`` on the device of ``images``; foreground class ``c``
            at channel ``c - 1``; with the background's share they sum to 1 per pixel.
        """
        was_training = self.training
        self.eval()
        pooled = self.head_prompts(self.encode_prompts().pooled)
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device, dtype=torch.float32)
            logits = self.head(self.image_encoder(batch), pooled)
            chunks.append(class_attention(logits)[:, 1:].to(images.device))
        self.train(was_training)
        return torch.cat(chunks) if chunks else images.new_zeros((0, len(self.prompts) - 1, *images.shape[2:]))

    @torch.no_grad()
    def prompt_response(self, images: torch.Tensor, text: str, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """How slices respond to a free-text prompt.

        A new text is added after the class prompts, so in the class attention it
        competes with them for every pixel; the text of a class prompt is read from that
        class's own channel (added again, the two identical prompts would split every
        pixel's share in half).

        Args:
            images: float ``(S, 1, H, W)`` in [0, 1].
            text: any text.
            batch_size: slices per forward pass.

        Returns:
            ``(probabilities, token_shares)``: float32 ``(S, H, W)``, the prompt's share
            of each pixel's attention, on the device of ``images``; float32 ``(T,)``, how
            much each of its T tokens accounts for the pixels that match it (see the
            module docstring), summing to 1.
        """
        was_training = self.training
        self.eval()
        prompts = list(self.prompts)
        if text not in prompts:
            prompts.append(text)
        channel = prompts.index(text)
        encoded = self.encode_prompts(prompts)
        count = int(encoded.mask[channel].sum())
        tokens = F.normalize(encoded.tokens[channel, :count], dim=-1)
        scale = self.head.log_scale.exp()
        maps, token_mass = [], torch.zeros(count, device=self.device)
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device, dtype=torch.float32)
            output = self(batch, encoded)
            response = output.class_attention[:, channel]
            token_softmax = torch.softmax(
                scale * torch.einsum("bdhw,td->bthw", F.normalize(output.pixel_embeddings.float(), dim=1), tokens), dim=1
            )
            token_mass += (token_softmax * response.unsqueeze(1)).sum(dim=(0, 2, 3))
            maps.append(response.to(images.device))
        self.train(was_training)
        shares = token_mass / token_mass.sum().clamp_min(torch.finfo(torch.float32).tiny)
        return torch.cat(maps), shares.cpu()
