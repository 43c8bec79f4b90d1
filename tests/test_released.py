"""A released PRX pixel pipeline as the start of a fine-tune (``model.init_from``): the config takes its settings and
prx encodes prompts exactly as diffusers' PRXPixelPipeline does, on a tiny random Qwen3-VL text backbone (no
download), end to end through ``prx train finetune``."""

import json
from pathlib import Path

import pytest
import torch

from prx.cli import main
from prx.config import load_config
from prx.text import TextEncoder
from test_diffusers import one_line_error
from test_small_data import photo_shard

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


def finetune_config(pipeline_dir, *overrides):
    return load_config("finetune", [f"model.init_from={pipeline_dir}", *overrides])


def test_settings_come_from_the_pipeline(pipeline_dir):
    config = finetune_config(pipeline_dir)
    m, t = config.model, config.text
    assert (m.hidden_dim, m.num_layers, m.patch_size, m.bottleneck_dim, m.resolution_embeds) == (64, 2, 16, 32, True)
    assert (t.encoder, t.max_length, t.clean, t.pad_to_max_length) == (str(pipeline_dir), MAX_TOKENS, "prx_pixel", True)
    assert (config.objective.noise_scale, config.data.resolution, config.objective.shift) == (1.5, 512, 3.0)
    # a key the config sets stays
    mine = finetune_config(pipeline_dir, "text.clean=none", "text.pad_to_max_length=false")
    assert (mine.text.clean, mine.text.pad_to_max_length) == ("none", False)


def pipeline_embeddings(pipeline_dir):
    from diffusers import PRXPixelPipeline

    pipe = PRXPixelPipeline.from_pretrained(pipeline_dir)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return pipe, embeds, mask


def assert_same_embeddings(encoder: TextEncoder, pipeline_dir):
    """prx's encoding gives PRXPixelPipeline.encode_prompt's embeddings for every token the mask lets through, and the
    same mask counts; so the transformer's output is the same."""
    pipe, theirs, their_mask = pipeline_embeddings(pipeline_dir)
    ours = encoder.encode(PROMPTS, cache=False)
    assert ours.mask.sum(1).tolist() == their_mask.sum(1).tolist()
    assert their_mask[3].sum() == 0 and their_mask[4].sum() == MAX_TOKENS  # "" has no token; the long one is cut
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(ours.embeds[i][ours.mask[i]], theirs[i][their_mask[i]], rtol=1e-5, atol=1e-5)
    x, t = torch.randn(len(PROMPTS), 3, 32, 48), torch.full((len(PROMPTS),), 0.7)
    with torch.no_grad():
        a = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=theirs, attention_mask=their_mask).sample
        b = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ours.embeds, attention_mask=ours.mask).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_text_embeddings_equal_the_pipelines(pipeline_dir):
    config = finetune_config(pipeline_dir)
    assert_same_embeddings(TextEncoder.from_config(config.text, "cpu"), pipeline_dir)
    # without the pipeline's cleaning the HTML-escaped prompt tokenises differently: the settings matter
    plain = TextEncoder.from_config(finetune_config(pipeline_dir, "text.clean=none").text, "cpu")
    ours = TextEncoder.from_config(config.text, "cpu")
    assert plain.encode([PROMPTS[1]], cache=False).mask.sum() != ours.encode([PROMPTS[1]], cache=False).mask.sum()


@pytest.mark.slow  # two training steps at 64 px of the tiny model, its Qwen3-VL encoder on every caption
def test_prx_train_finetune_of_a_released_pipeline_trains_with_its_text_encoding(pipeline_dir, tmp_path, capsys):
    """The whole path: `prx train finetune model.init_from=DIR` trains, and the run encodes captions as the pipeline
    encodes prompts (the encoder the run's own config.yaml describes)."""
    shards = photo_shard(tmp_path / "photos" / "photos.parquet", 8)
    run = tmp_path / "run"
    assert main(["train", "finetune", f"model.init_from={pipeline_dir}", f"data.shards=[{shards}]", "data.resolution=64",
                 "data.num_workers=0", "train.steps=2", "logging.sample_every=0", "logging.progress_bar=false",
                 "--out", str(run)]) == 0
    assert "initialised from diffusers checkpoint" in capsys.readouterr().out
    saved = load_config(run / "config.yaml")
    assert (saved.text.clean, saved.text.pad_to_max_length, saved.objective.noise_scale) == ("prx_pixel", True, 1.5)
    assert_same_embeddings(TextEncoder.from_config(saved.text, "cpu"), pipeline_dir)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/total"] for row in metrics if "loss/total" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_a_hub_id_in_the_local_cache_is_found_offline(pipeline_dir, tmp_path, monkeypatch):
    """model.init_from=ORG/NAME: the snapshot in the Hugging Face cache, as `hf download` leaves it."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--prxpixel-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(pipeline_dir, snapshot)
    (cache / "models--someone--prxpixel-tiny" / "refs").mkdir()
    (cache / "models--someone--prxpixel-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    config = finetune_config("someone/prxpixel-tiny")
    assert config.model.init_from == "someone/prxpixel-tiny" and config.text.encoder == str(snapshot)
    assert (config.model.hidden_dim, config.text.clean, config.text.max_length) == (64, "prx_pixel", MAX_TOKENS)


def test_what_is_not_a_prx_pixel_pipeline_is_one_line_error(tmp_path, pipeline_dir, capsys):
    def refused(path, fragment):
        one_line_error(capsys, fragment, "train", "finetune", f"model.init_from={path}", "--out", tmp_path / "run")

    refused(tmp_path / "nowhere", "does not exist")
    refused(tmp_path, "is not a diffusers checkpoint")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    refused(tmp_path / "file.safetensors", "is a file")
    refused("nobody/no-such-model", "hf download nobody/no-such-model")
    latent = tmp_path / "latent"
    (latent / "transformer").mkdir(parents=True)
    (latent / "model_index.json").write_text(json.dumps({"_class_name": "PRXPipeline"}))
    (latent / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PRXTransformer2DModel",
                                                                    "in_channels": 16}))
    refused(latent, "latent-space PRX")
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    refused(other, "not a PRXTransformer2DModel")


@pytest.mark.slow  # a traced step for each padding side's pipeline
def test_prx_plan_of_a_pipeline_counts_its_own_text_encoder(pipeline_dir, capsys):
    """`prx plan finetune model.init_from=DIR lora.enabled=true`: the pipeline's shape, its Qwen3-VL text encoder
    counted from its config, the adapters."""
    from transformers import AutoConfig

    from prx.memory import text_encoder_spec

    assert main(["plan", "finetune", f"model.init_from={pipeline_dir}", "lora.enabled=true", "lora.rank=4",
                 "data.resolution=64", "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    encoder = text_encoder_spec(AutoConfig.from_pretrained(pipeline_dir / "text_encoder"))
    assert "2 blocks, hidden 64" in out and "LoRA rank 4" in out and "fits in 8 GiB" in out, out
    assert f"| text encoder ({pipeline_dir}) | {encoder.weights / 2**30:.2f} |" in out, out
