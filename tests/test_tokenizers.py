"""Byte-level and Hugging Face tokenizers."""

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

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

    loaded = load_tokenizer(tmp_path, bos_id=1, eos_id=2)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.vocab_size == tokenizer.get_vocab_size()
    ids = loaded.encode("the lazy fox")
    assert ids == tokenizer.encode("the lazy fox").ids
    assert loaded.decode([1, *ids, 2]) == "the lazy fox"


def test_without_tokenizer_json_the_byte_tokenizer_is_used(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
