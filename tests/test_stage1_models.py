"""The stage-1 model: shapes, one prompt-pixel map (class attention = class maps), head bounds, gradients."""

from __future__ import annotations

import torch

from cps4_engine.losses import Stage1Loss, Stage1LossWeights, one_hot_targets
from cps4_engine.models.image_encoder import build_image_encoder
from cps4_engine.models.text import load_text_encoder
from cps4_engine.models.vlm import VLM, PromptPixelHead
from cps4_engine.presets import get_preset

PROMPTS = ["background"] + [f"l{i} vertebra" for i in range(1, 20)]


def _tiny_vlm() -> VLM:
    torch.manual_seed(0)
    preset = get_preset("tiny")
    return VLM(build_image_encoder(preset), load_text_encoder("tiny", embed_dim=preset.embed_dim), PROMPTS, preset)


def test_output_shapes_and_class_attention_is_the_softmax_of_the_logits() -> None:
    vlm = _tiny_vlm().eval()
    prompts = vlm.encode_prompts(PROMPTS[:-1] + ["a much longer prompt about a herniated t12/l1 intervertebral disc"])
    output = vlm(torch.rand(2, 1, 64, 32), prompts)
    assert output.logits.shape == (2, 20, 64, 32) and output.class_attention.shape == (2, 20, 64, 32)
    assert torch.allclose(output.class_attention.sum(dim=1), torch.ones(2, 64, 32), atol=1e-5)
    assert torch.allclose(output.class_attention, torch.softmax(output.logits, dim=1), atol=1e-6)
    scale, bias = float(vlm.head.log_scale.exp()), float(vlm.head.bias)
    assert float((output.logits - bias).abs().max()) <= scale + 1e-4


def test_the_token_loss_reaches_the_logits_the_class_maps_read() -> None:
    vlm = _tiny_vlm()
    labels = torch.zeros(2, 64, 32, dtype=torch.long)
    labels[:, 20:30, 8:20] = 4
    targets = one_hot_targets(labels, 20)
    output = vlm(torch.rand(2, 1, 64, 32))
    output.logits.retain_grad()
    losses = Stage1Loss(Stage1LossWeights(alignment=0.0, token=1.0, pixel=0.0))(output, targets, torch.ones_like(targets, dtype=torch.bool))
    losses["total"].backward()
    assert set(losses) == {"token", "total"}
    assert float(output.logits.grad[:, 4].abs().sum()) > 0  # the class map of class 4 is pushed
    assert float(output.logits.grad[:, 4, 20:30, 8:20].sum()) < 0  # up inside its mask (descent raises it)


def test_the_attention_losses_change_the_class_maps_stage_2_reads() -> None:
    images = torch.rand(2, 1, 64, 32)
    labels = torch.zeros(2, 64, 32, dtype=torch.long)
    labels[:, 20:30, 8:20] = 4
    targets = one_hot_targets(labels, 20)
    maps = {}
    for name, weights in {"alignment only": Stage1LossWeights(token=0.0, pixel=0.0),
                          "all losses": Stage1LossWeights()}.items():
        vlm = _tiny_vlm()
        optimizer = torch.optim.SGD(vlm.parameters(), lr=0.1)
        loss = Stage1Loss(weights)(vlm(images), targets, torch.ones_like(targets, dtype=torch.bool))["total"]
        loss.backward()
        optimizer.step()
        maps[name] = vlm.class_probabilities(images)
    assert float((maps["alignment only"] - maps["all losses"]).abs().max()) > 1e-4


def test_gradients_reach_both_encoders() -> None:
    vlm = _tiny_vlm()
    labels = torch.zeros(2, 64, 32, dtype=torch.long)
    labels[:, 20:30, 8:20] = 4
    targets = one_hot_targets(labels, 20)
    losses = Stage1Loss(Stage1LossWeights(alignment=0.0, contrastive=0.0))(vlm(torch.rand(2, 1, 64, 32)), targets, torch.ones_like(targets, dtype=torch.bool))
    assert set(losses) == {"token", "pixel", "total"}
    losses["total"].backward()
    image_grad = sum(float(p.grad.abs().sum()) for p in vlm.image_encoder.parameters() if p.grad is not None)
    text_grad = sum(float(p.grad.abs().sum()) for p in vlm.text_encoder.backbone.parameters() if p.grad is not None)
    assert image_grad > 0 and text_grad > 0
    assert vlm.text_encoder.backbone.get_input_embeddings().weight.grad is None  # vocabulary table frozen


def test_class_probabilities_are_the_batched_foreground_class_attention() -> None:
    vlm = _tiny_vlm().eval()
    images = torch.rand(5, 1, 64, 32)
    probabilities = vlm.class_probabilities(images, batch_size=2)
    with torch.no_grad():
        expected = vlm(images).class_attention[:, 1:]
    assert probabilities.shape == (5, 19, 64, 32) and torch.allclose(probabilities, expected, atol=1e-5)
    assert float(probabilities.sum(dim=1).max()) <= 1.0 + 1e-5
    text = "the third lumbar vertebra"
    heat, shares = vlm.prompt_response(images[:2], text)
    tokens = int(vlm.encode_prompts([text]).mask[0].sum())
    assert heat.shape == (2, 64, 32) and shares.shape == (tokens,) and abs(float(shares.sum()) - 1.0) < 1e-5
    with torch.no_grad():
        free = vlm(images[:2], vlm.encode_prompts([*PROMPTS, text])).class_attention[:, -1]
    assert torch.allclose(heat, free, atol=1e-6)


def test_a_class_prompts_own_text_reads_its_channel_at_full_share() -> None:
    vlm = _tiny_vlm().eval()
    images = torch.rand(3, 1, 64, 32)
    l3 = 4
    heat, shares = vlm.prompt_response(images, vlm.prompts[l3])
    assert torch.allclose(heat, vlm.class_probabilities(images)[:, l3 - 1], atol=1e-5), "not split with a duplicate"
    assert abs(float(shares.sum()) - 1.0) < 1e-5


def test_paper_preset_builds_a_vit_b16_unetr() -> None:
    preset = get_preset("paper")
    encoder = build_image_encoder(preset)
    assert type(encoder).__name__ == "UNETR"
    assert encoder.vit.patch_embedding.patch_embeddings.weight.shape[-2:] == (16, 16)
    assert len(encoder.vit.blocks) == 12 and 85e6 < sum(p.numel() for p in encoder.vit.parameters()) < 95e6


def test_prompt_centring_subtracts_the_class_mean_from_class_and_free_prompts() -> None:
    vlm = _tiny_vlm().eval()
    encoded = vlm.encode_prompts([*PROMPTS, "a bright l3 vertebra"])
    centred = vlm.head_prompts(encoded.pooled)
    class_mean = encoded.pooled[:20].mean(dim=0)
    assert torch.allclose(centred[:20].mean(dim=0), torch.zeros_like(class_mean), atol=1e-6)
    assert torch.allclose(centred[20], encoded.pooled[20] - class_mean, atol=1e-6)
    with torch.no_grad():
        output = vlm(torch.rand(1, 1, 64, 32), encoded)
    assert torch.allclose(output.prompt_embeddings, centred)
    raw = torch.nn.functional.normalize(encoded.pooled[:20], dim=1)
    shifted = torch.nn.functional.normalize(centred[:20], dim=1)
    off_diagonal = ~torch.eye(20, dtype=torch.bool)
    assert float((raw @ raw.T)[off_diagonal].mean()) > 0.5 > 0 > float((shifted @ shifted.T)[off_diagonal].mean())


def test_without_centring_the_heads_see_the_raw_pooled_prompts() -> None:
    preset = get_preset("tiny")
    vlm = VLM(build_image_encoder(preset), load_text_encoder("tiny", embed_dim=preset.embed_dim), PROMPTS, preset, centre_prompts=False).eval()
    encoded = vlm.encode_prompts()
    assert torch.equal(vlm.head_prompts(encoded.pooled), encoded.pooled)


def test_prompt_pixel_head_is_the_scaled_cosine_for_slice_maps_and_pooled_vectors() -> None:
    torch.manual_seed(3)
    head = PromptPixelHead(initial_scale=7.0, initial_bias=-2.0)
    prompts = torch.randn(5, 6)
    pixels = torch.randn(2, 6, 4, 3)
    pixels[1, :, 0, 0] = 0.0
    expected = 7.0 * torch.nn.functional.cosine_similarity(
        pixels.unsqueeze(1), prompts.view(1, 5, 6, 1, 1), dim=2, eps=1e-12) - 2.0
    assert torch.allclose(head(pixels, prompts), expected, atol=1e-5)
    assert torch.equal(head(pixels, prompts)[1, :, 0, 0], torch.full((5,), -2.0))
    pooled = pixels.mean(dim=(2, 3))
    expected_pooled = 7.0 * torch.nn.functional.cosine_similarity(pooled.unsqueeze(1), prompts.unsqueeze(0), dim=2) - 2.0
    assert torch.allclose(head(pooled, prompts), expected_pooled, atol=1e-5)
