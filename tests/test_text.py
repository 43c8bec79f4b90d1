import pytest
import torch

from prx.errors import PrxError
from prx.text import TextEncoder


def test_minilm_offline(text_encoder):
    assert text_encoder.dim == 384
    batch = text_encoder.encode(["a red circle in the top left", "", "a blue square"])
    assert batch.embeds.shape[0] == 3 and batch.embeds.shape[1] % 8 == 0 and batch.embeds.shape[2] == 384
    lengths = batch.mask.sum(1).tolist()
    assert lengths[1] >= 1  # the empty caption still has its special tokens
    assert lengths[0] > lengths[2]
    assert torch.all(batch.embeds[~batch.mask] == 0)
    # real embeddings: similar captions are closer than unrelated ones
    pooled = [text_encoder.encode([c]).embeds[0, 1:-1].mean(0) for c in ("a red car", "a red automobile", "a green "
                                                                                                          "forest")]
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0)


def test_a_stand_in_encoder_is_written_once_and_loads_as_a_real_one(tmp_path, monkeypatch):
    """text.encoder=random-minilm (MiniLM's shape, random weights; tiny-random-bert here) needs no wheel and no
    network: written once under $PRX_CACHE, then loaded by the same code as a real encoder; any caption
    tokenizes (a character vocabulary), and its width is known without loading it."""
    from prx.text import STAND_IN_ENCODERS, stand_in_encoder, text_width

    monkeypatch.setenv("PRX_CACHE", str(tmp_path))
    first = TextEncoder("tiny-random-bert", max_length=64)
    assert first.dim == text_width("tiny-random-bert") == STAND_IN_ENCODERS["tiny-random-bert"]["hidden_size"]
    batch = first.encode(["A red circle, left of 2 blue squares!", ""], cache=False)
    lengths = batch.mask.sum(1).tolist()
    assert lengths == [len("a red circle , left of 2 blue squares !".replace(" ", "")) + 2, 2]  # [CLS] chars [SEP]
    assert first.tokenizer.unk_token_id not in first.tokenizer("Ünïcode? ok")["input_ids"][1:3]
    written = (stand_in_encoder("tiny-random-bert") / "model.safetensors").stat().st_mtime_ns
    again = TextEncoder("tiny-random-bert", max_length=64)  # read back, not rewritten: the same weights
    assert (stand_in_encoder("tiny-random-bert") / "model.safetensors").stat().st_mtime_ns == written
    assert torch.equal(again.encode(["a red circle"], cache=False).embeds, first.encode(["a red circle"], cache=False).embeds)
    assert text_width("random-minilm") == STAND_IN_ENCODERS["random-minilm"]["hidden_size"] == 384


def test_repeated_captions_are_not_reencoded(text_encoder):
    before = text_encoder.encoded_count
    a = text_encoder.encode(["a caption seen twice", "a caption seen twice", "another one"])
    assert text_encoder.encoded_count - before == 2
    b = text_encoder.encode(["another one", "a caption seen twice"])
    assert text_encoder.encoded_count - before == 2
    assert torch.equal(a.embeds[0, : a.mask[0].sum()], b.embeds[1, : b.mask[1].sum()])


def test_the_caption_cache_keeps_to_its_memory_bound_least_recently_used_first(tmp_path, monkeypatch):
    """text.cache_gib: the cache's encodings never take more than the bound, however many captions it may hold;
    the least recently used go first, and a caption it still holds is not encoded again. (On a GPU they stay on
    the device, text.cache_device=auto; a CPU run's are on the host either way.)"""
    monkeypatch.setenv("PRX_CACHE", str(tmp_path))
    probe = TextEncoder("tiny-random-bert", max_length=64)
    per_caption = probe._encode_uncached(["caption 0"])[0]  # "caption N": the same token count for every N < 10
    size = per_caption.numel() * per_caption.element_size()
    encoder = TextEncoder("tiny-random-bert", max_length=64, cache_gib=3.5 * size / 2**30)
    assert not encoder.cache_on_device
    encoder.encode(["caption 0", "caption 1", "caption 2"])
    encoder.encode(["caption 0"])  # now the most recently used
    encoder.encode(["caption 3"])  # over the bound: caption 1, the least recently used, goes
    assert list(encoder._cache) == ["caption 2", "caption 0", "caption 3"]
    assert encoder._cached_bytes == 3 * size <= encoder.cache_bytes
    count = encoder.encoded_count
    batch = encoder.encode(["caption 3", "caption 0", "caption 2"])
    assert encoder.encoded_count == count and batch.embeds.device.type == "cpu"
    with encoder.cache_scope():  # what a scope adds leaves with it (and pushed caption 3 out), bytes included
        encoder.encode(["caption 7"])
    assert list(encoder._cache) == ["caption 0", "caption 2"] and encoder._cached_bytes == 2 * size
    assert not TextEncoder("tiny-random-bert", max_length=64, cache_device="cpu").cache_on_device


def test_min_length_pads_every_batch_to_one_length(text_encoder):
    """text.min_length: a batch of short captions is padded (masked) to the floor, so a compiled model
    sees the same text length; the real tokens are unchanged and a longer batch still grows."""
    from prx.config import load_config
    from prx.errors import ConfigError

    short = text_encoder.encode(["a red circle"])
    floor = TextEncoder("minilm", max_length=48, min_length=24)
    padded = floor.encode(["a red circle"])
    assert short.embeds.shape[1] == 8 and padded.embeds.shape[1] == 24
    assert torch.equal(padded.mask.sum(1), short.mask.sum(1))
    assert torch.equal(padded.embeds[:, :8], short.embeds) and torch.all(padded.embeds[:, 8:] == 0)
    assert floor.encode(["a red circle in the top left and " * 3]).embeds.shape[1] == 32
    assert load_config("demo").text.min_length == 24 and load_config("demo").text.num_layers == 3
    with pytest.raises(ConfigError, match="text.min_length"):
        load_config("demo", ["text.min_length=64"])


def _tokenizer_dir(tmp_path):
    """Any saved tokenizer works with any tiny model whose vocab covers it: reuse MiniLM's."""
    from transformers import AutoTokenizer

    from prx.text import resolve_encoder

    tok = AutoTokenizer.from_pretrained(resolve_encoder("minilm"))
    tok.save_pretrained(tmp_path)
    return tok.vocab_size


@pytest.mark.parametrize("kind", ["bert", "t5", "clip", "t5gemma"])
def test_hf_encoders_from_local_directories(tmp_path, kind):
    import transformers as tf

    vocab = _tokenizer_dir(tmp_path)
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    elif kind == "t5":
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    elif kind == "clip":
        model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64))
    else:  # the real T5Gemma checkpoints are encoder-decoder; we load the encoder only
        enc = tf.T5GemmaModuleConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        model = tf.T5GemmaModel(tf.T5GemmaConfig(encoder=enc, decoder=enc))
    model.save_pretrained(tmp_path)
    encoder = TextEncoder(str(tmp_path), max_length=16)
    assert encoder.dim == 32
    batch = encoder.encode(["hello world", "a much longer caption than the first one"])
    assert batch.embeds.shape[0] == 2 and batch.embeds.shape[2] == 32
    assert batch.mask[1].sum() > batch.mask[0].sum() and batch.mask[1].sum() <= 16  # max_length truncates
    assert torch.isfinite(batch.embeds).all()
    # text.num_layers: only the first layer is built and run; BERT's output is then the full model's layer-1 state
    first = TextEncoder(str(tmp_path), max_length=16, num_layers=1)
    inner = getattr(first.model.config, "encoder", first.model.config)
    assert getattr(inner, "num_hidden_layers", getattr(inner, "num_layers", None)) == 1
    assert sum(p.numel() for p in first.model.parameters()) < sum(p.numel() for p in encoder.model.parameters())
    one = first.encode(["hello world"], cache=False)
    assert torch.isfinite(one.embeds).all() and not torch.allclose(one.embeds, encoder.encode(["hello world"], cache=False).embeds)
    if kind == "bert":
        tokens = encoder.tokenizer(["hello world"], return_tensors="pt")
        states = encoder.model(**tokens, output_hidden_states=True).hidden_states
        torch.testing.assert_close(one.embeds[0, : one.mask[0].sum()], states[1][0])
    with pytest.raises(PrxError, match="has 2 layers"):
        TextEncoder(str(tmp_path), num_layers=3)


def test_missing_encoder_says_what_to_do(tmp_path):
    with pytest.raises(PrxError, match="could not be loaded.*local directory"):
        TextEncoder(str(tmp_path / "no-such-encoder"))


def test_a_padded_batch_places_each_captions_tokens_and_masks_the_rest():
    """padded_batch (what crosses to a GPU is only the real tokens and their rows): caption i's tokens at rows
    0..n_i of batch row i, zeros and a False mask after them, for captions of 1 token up to the whole length."""
    from prx.text import padded_batch

    gen = torch.Generator().manual_seed(0)
    encodings = [torch.randn(n, 6, generator=gen) for n in (3, 1, 8, 5)]
    batch = padded_batch(encodings, 8, "cpu")
    assert batch.embeds.shape == (4, 8, 6) and batch.mask.dtype == torch.bool
    for i, e in enumerate(encodings):
        n = e.shape[0]
        assert torch.equal(batch.embeds[i, :n], e) and not batch.embeds[i, n:].any()
        assert batch.mask[i, :n].all() and not batch.mask[i, n:].any()
