"""Byte-level and Hugging Face tokenizers."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from jaxhet import ConfigError
from jaxhet.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓ 你好'\n"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_skips_specials_and_repairs_broken_utf8():
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode("ok ✓")[:-1], tokenizer.eos_id]
    assert tokenizer.decode(ids) == "ok \ufffd"


def test_hf_tokenizer_json_is_loaded_from_a_checkpoint_dir(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    (tmp_path / "config.json").write_text('{"bos_token_id": 1, "eos_token_id": [2, 9]}')
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.vocab_size == tokenizer.get_vocab_size()
    ids = loaded.encode("the lazy fox")
    assert ids == tokenizer.encode("the lazy fox").ids
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    assert loaded.decode([1, *ids, 2]) == "the lazy fox"


def test_byte_spec_and_a_directory_without_tokenizer_json(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="tokenizer must be 'byte' or a directory holding tokenizer.json"):
        load_tokenizer(tmp_path)
