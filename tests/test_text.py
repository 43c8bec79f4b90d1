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
    pooled = [text_encoder.encode([c]).embeds[0, 1:-1].mean(0) for c in ("a red car", "a red automobile", "a green forest")]
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0)


def test_repeated_captions_are_not_reencoded(text_encoder):
    before = text_encoder.encoded_count
    a = text_encoder.encode(["a caption seen twice", "a caption seen twice", "another one"])
    assert text_encoder.encoded_count - before == 2
    b = text_encoder.encode(["another one", "a caption seen twice"])
    assert text_encoder.encoded_count - before == 2
    assert torch.equal(a.embeds[0, : a.mask[0].sum()], b.embeds[1, : b.mask[1].sum()])


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
        model = tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    elif kind == "t5":
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    elif kind == "clip":
        model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
    else:  # the real T5Gemma checkpoints are encoder-decoder; we load the encoder only
        enc = tf.T5GemmaModuleConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        model = tf.T5GemmaModel(tf.T5GemmaConfig(encoder=enc, decoder=enc))
    model.save_pretrained(tmp_path)
    encoder = TextEncoder(str(tmp_path), max_length=16)
    assert encoder.dim == 32
    batch = encoder.encode(["hello world", "a much longer caption than the first one"])
    assert batch.embeds.shape[0] == 2 and batch.embeds.shape[2] == 32
    assert batch.mask[1].sum() > batch.mask[0].sum() and batch.mask[1].sum() <= 16  # max_length truncates
    assert torch.isfinite(batch.embeds).all()


def test_missing_encoder_says_what_to_do(tmp_path):
    with pytest.raises(PrxError, match="could not be loaded.*local directory"):
        TextEncoder(str(tmp_path / "no-such-encoder"))
