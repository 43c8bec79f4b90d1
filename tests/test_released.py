"""A released PRX pixel pipeline as the start of a fine-tune: prx reads its settings and encodes prompts exactly as
diffusers' PRXPixelPipeline does, on a tiny random Qwen3-VL text backbone (no download)."""

import json
from pathlib import Path

import pytest
import torch

from prx.errors import PrxError
from prx.released import read_pipeline

PROMPTS = [
    "a red circle in the top left",
    "  Astronaut &amp;amp; cat  ",  # HTML unescaped twice, spaces stripped
    "cafÃ© with a dog",  # mojibake that ftfy repairs
    "",  # the negative prompt: no token at all
    "a long caption " * 12,  # truncated at prompt_max_tokens
]
MAX_TOKENS = 16


def tiny_tokenizer(padding_side: str):
    """A byte-level BPE like Qwen's (no BOS/EOS added, <|endoftext|> pads), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red circle in the top left", "an astronaut & a cat", "café with a dog",
                             "a long caption"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   padding_side=padding_side)


def save_tiny_pipeline(root: Path, padding_side: str = "right") -> Path:
    """A PRXPixelPipeline directory as diffusers writes it: tiny transformer, Qwen3-VL text backbone, BPE tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline, PRXTransformer2DModel
    from transformers import Qwen3VLTextConfig, Qwen3VLTextModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(padding_side)
    text_config = Qwen3VLTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64,
                                    rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                     "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    transformer = PRXTransformer2DModel(in_channels=3, patch_size=16, context_in_dim=32, hidden_size=64, mlp_ratio=2.0,
                                        num_heads=2, depth=2, axes_dim=[16, 16], bottleneck_size=32,
                                        resolution_embeds=True)
    with torch.no_grad():
        for p in transformer.parameters():  # off its zero init: the output depends on the text
            p.add_(torch.randn_like(p) * 0.1)
    pipe = PRXPixelPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                            text_encoder=Qwen3VLTextModel(text_config).eval(), tokenizer=tokenizer,
                            default_sample_size=512, prompt_max_tokens=MAX_TOKENS, noise_scale=1.5)
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module", params=["right", "left"])
def pipeline_dir(request, tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp(f"prxpixel-{request.param}"), request.param)


def test_settings_come_from_the_pipeline(pipeline_dir):
    released = read_pipeline(pipeline_dir)
    assert (released.noise_scale, released.default_sample_size, released.prompt_max_tokens) == (1.5, 512, MAX_TOKENS)
    assert released.resolution_embeds and released.text_encoder_class == "Qwen3VLTextModel"
    assert released.model_fields["text_dim"] == 32 and released.model_fields["hidden_dim"] == 64
    assert released.model_config().bottleneck_dim == 32 and released.model_config().resolution_embeds
    overrides = released.config_overrides()
    assert overrides["objective.noise_scale"] == 1.5 and overrides["text.max_length"] == MAX_TOKENS
    assert overrides["text.clean"] == "prx_pixel" and overrides["text.pad_to_max_length"] is True
    assert overrides["sampling.shift"] == 3.0 and overrides["model.init_from"] == str(pipeline_dir)
    # every key is one prx's config takes, with the shape of the released transformer
    from prx.config import load_config

    config = load_config("tiny", [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()])
    assert (config.model.hidden_dim, config.model.resolution_embeds, config.text.tokenizer) == (
        64, True, str(released.tokenizer_dir))


def test_text_embeddings_equal_the_pipelines(pipeline_dir):
    """prx's TextEncoder, loaded from the pipeline's text_encoder/ + tokenizer/, gives PRXPixelPipeline.encode_prompt's
    embeddings for every token the mask lets through, and the same mask counts; so the transformer's output is the same."""
    from diffusers import PRXPixelPipeline

    pipe = PRXPixelPipeline.from_pretrained(pipeline_dir)
    theirs, their_mask, _, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ours = read_pipeline(pipeline_dir).text_encoder().encode(PROMPTS, cache=False)
    assert ours.mask.sum(1).tolist() == their_mask.sum(1).tolist()
    assert their_mask[3].sum() == 0 and their_mask[4].sum() == MAX_TOKENS  # "" has no token; the long one is cut
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(ours.embeds[i][ours.mask[i]], theirs[i][their_mask[i]], rtol=1e-5, atol=1e-5)
    x, t = torch.randn(len(PROMPTS), 3, 32, 48), torch.full((len(PROMPTS),), 0.7)
    with torch.no_grad():
        a = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=theirs, attention_mask=their_mask).sample
        b = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ours.embeds, attention_mask=ours.mask).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and without the pipeline's cleaning the HTML-escaped prompt tokenises differently: the settings matter
    plain = read_pipeline(pipeline_dir).text_encoder(clean="none")
    assert plain.encode([PROMPTS[1]], cache=False).mask.sum() != ours.mask[1].sum()


def test_what_is_not_a_prx_pixel_pipeline_is_one_line_error(tmp_path, pipeline_dir):
    def refused(path, fragment):
        with pytest.raises(PrxError) as e:
            read_pipeline(path)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)

    refused(tmp_path / "nowhere", "does not exist")
    refused(tmp_path, "no model_index.json")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PRXPipeline"}))
    refused(tmp_path, "latent-space PRX")
    refused("nobody/no-such-model", "hf download nobody/no-such-model")
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "transformer").symlink_to(pipeline_dir / "transformer")
    (broken / "model_index.json").write_text(json.dumps(index))
    refused(broken, "no text_encoder/ component")
