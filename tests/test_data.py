"""Training data pipeline: packing invariants, corpora, splits, determinism and exact resumption."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from jaxhet.data import DataConfig, PackedBatches, stdlib_corpus_files
from jaxhet.models import ConfigError
from jaxhet.tokenizers import ByteTokenizer, HFTokenizer

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id


def write_corpus(root: Path, count: int = 12) -> dict[str, str]:
    """`count` documents of varied length (some longer than a row) in nested directories; returns path -> text."""
    texts = {}
    for i in range(count):
        path = root / f"part{i % 3}" / f"doc{i}{('.txt', '.md', '.py')[i % 3]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"document {i}: " + "".join(chr(97 + (i * 7 + j) % 26) for j in range(5 + 17 * i))
        path.write_text(text)
        texts[str(path)] = text
    (root / "part0" / "ignored.bin").write_bytes(b"not a text document")
    return texts


def take(batches: PackedBatches, count: int) -> list[dict[str, np.ndarray]]:
    return [next(batches) for _ in range(count)]


def documents_of(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Rebuild the packed documents (with BOS/EOS) from batches, in order; the last one may be incomplete.

    A segment's tokens are its inputs plus, when the last input is weighted, its target (the document goes on in
    the next row, which then starts again with that target)."""
    documents: list[list[int]] = []
    for batch in batches:
        for inputs, targets, weights, segments in zip(
            batch["input_ids"], batch["targets"], batch["weights"], batch["segment_ids"], strict=True
        ):
            for segment in np.unique(segments):
                where = np.flatnonzero(segments == segment)
                piece = inputs[where].tolist() + ([int(targets[where[-1]])] if weights[where[-1]] else [])
                if piece[0] == BOS:
                    documents.append(piece)
                else:
                    assert documents[-1][-1] == piece[0], "a continued document restarts with the row's last token"
                    documents[-1].extend(piece[1:])
    return documents


def assert_packing_invariants(batch: dict[str, np.ndarray], config: DataConfig) -> None:
    shape = (config.batch_size, config.seq_len)
    expected_dtypes = {"input_ids": np.int32, "targets": np.int32, "weights": np.float32, "segment_ids": np.int32}
    for name, dtype in expected_dtypes.items():
        assert batch[name].shape == shape and batch[name].dtype == dtype, name
    inputs, targets, weights, segments = (batch[k] for k in ("input_ids", "targets", "weights", "segment_ids"))
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(weights[:, :-1], segments[:, :-1] == segments[:, 1:])
    # With BOS opening every document, a target is from another document exactly when it is a BOS.
    np.testing.assert_array_equal(weights, targets != BOS)
    np.testing.assert_array_equal(weights[inputs == EOS], 0)
    assert (segments[:, 0] == 1).all()
    assert set(np.unique(np.diff(segments, axis=1))) <= {0, 1}


def test_packing_invariants_and_every_document_once_per_epoch(tmp_path):
    texts = write_corpus(tmp_path)
    config = DataConfig(source=str(tmp_path), seq_len=32, batch_size=4)
    batches = PackedBatches(config)
    expected_tokens = sum(len(t.encode()) + 2 for t in texts.values())
    assert batches.tokens_per_epoch == expected_tokens
    assert batches.vocab_size == ByteTokenizer.vocab_size and isinstance(batches.tokenizer, ByteTokenizer)

    seen = take(batches, 2 * expected_tokens // (config.batch_size * config.seq_len) + 2)
    for batch in seen:
        assert_packing_invariants(batch, config)
    documents = documents_of(seen)
    first_epoch = documents[: len(texts)]
    assert all(d[0] == BOS and d[-1] == EOS for d in first_epoch)
    assert sorted(ByteTokenizer().decode(d) for d in first_epoch) == sorted(texts.values())
    second_epoch = [ByteTokenizer().decode(d) for d in documents[len(texts) : 2 * len(texts)]]
    assert sorted(second_epoch) == sorted(texts.values())
    assert second_epoch != [ByteTokenizer().decode(d) for d in first_epoch], "each epoch is reshuffled"


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    write_corpus(tmp_path)
    config = DataConfig(source=str(tmp_path), seq_len=16, batch_size=2, seed=3)
    first = take(PackedBatches(config), 20)
    assert_same_batches(first, take(PackedBatches(config), 20))
    other = take(PackedBatches(DataConfig(source=str(tmp_path), seq_len=16, batch_size=2, seed=4)), 20)
    assert any((a["input_ids"] != c["input_ids"]).any() for a, c in zip(first, other, strict=True))


def assert_same_batches(first: list[dict[str, np.ndarray]], second: list[dict[str, np.ndarray]]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(("skip", "epoch_at_save"), [(3, 0), (25, 1), (61, 3)])
def test_restore_continues_exactly_across_epochs(tmp_path, skip, epoch_at_save):
    write_corpus(tmp_path)
    config = DataConfig(source=str(tmp_path), seq_len=24, batch_size=3, seed=1)
    batches = PackedBatches(config)
    take(batches, skip)
    state = json.loads(json.dumps(batches.state()))
    assert state["epoch"] == epoch_at_save and state["offset"] > 0, "saved in the middle of a document"
    continued = take(batches, 40)
    assert batches.state()["epoch"] >= epoch_at_save + 2, "the compared batches span epoch boundaries"

    restored = PackedBatches(config)
    restored.restore(state)
    assert_same_batches(continued, take(restored, 40))


def test_restore_in_the_middle_of_a_stdlib_file():
    config = DataConfig(seq_len=128, batch_size=4, seed=2)
    batches = PackedBatches(config)
    take(batches, 30)
    state = json.loads(json.dumps(batches.state()))
    continued = take(batches, 20)
    restored = PackedBatches(config)
    restored.restore(state)
    assert_same_batches(continued, take(restored, 20))


def test_restore_rejects_foreign_or_corrupt_states(tmp_path):
    write_corpus(tmp_path)
    batches = PackedBatches(DataConfig(source=str(tmp_path), seed=1))
    state = batches.state()
    with pytest.raises(ValueError, match="seed 1 .here 2."):
        PackedBatches(DataConfig(source=str(tmp_path), seed=2)).restore(state)
    with pytest.raises(ValueError, match="position"):
        batches.restore({**state, "position": 12})
    with pytest.raises(ValueError, match="offset"):
        batches.restore({**state, "offset": 10**6})


def test_jsonl_source_one_document_per_line(tmp_path):
    texts = ["first document ✓", "second\nwith a newline", "third " * 30]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    batches = PackedBatches(DataConfig(source=str(path), seq_len=16, batch_size=4))
    documents = documents_of(take(batches, 6))[:3]
    assert sorted(ByteTokenizer().decode(d) for d in documents) == sorted(texts)


def test_jsonl_line_without_text_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text key"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*'text'"):
        take(PackedBatches(DataConfig(source=str(path), seq_len=8, batch_size=2, seed=5)), 4)


def test_single_text_file_and_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    batch = next(PackedBatches(DataConfig(source=str(path), seq_len=16, batch_size=2)))
    text = ByteTokenizer().decode(batch["input_ids"][0].tolist() + [int(batch["targets"][0, -1])])
    assert text.startswith("caf\ufffd na\ufffdv")


def test_stdlib_corpus_is_found_and_multi_megabyte():
    files = stdlib_corpus_files()
    parts = {part for f in files for part in f.parts}
    assert any(f.name == "os.py" for f in files)
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert sum(f.stat().st_size for f in files) > 4_000_000
    config = DataConfig(seq_len=64, batch_size=2)
    assert_packing_invariants(next(PackedBatches(config)), config)


def test_validation_split_is_disjoint_from_train(tmp_path):
    texts = write_corpus(tmp_path, count=10)
    split_documents = {}
    for split in ("train", "validation"):
        config = DataConfig(source=str(tmp_path), seq_len=32, batch_size=4, validation_fraction=0.2, seed=7)
        batches = PackedBatches(config, split=split)
        decoded = [ByteTokenizer().decode(d) for d in documents_of(take(batches, 20))[:-1]]
        split_documents[split] = set(decoded)
        assert len(split_documents[split]) == {"train": 8, "validation": 2}[split]
    assert not split_documents["train"] & split_documents["validation"]
    assert split_documents["train"] | split_documents["validation"] == set(texts.values())


def test_max_documents_caps_each_epoch(tmp_path):
    write_corpus(tmp_path)
    batches = PackedBatches(DataConfig(source=str(tmp_path), seq_len=32, batch_size=4, max_documents=3))
    documents = [ByteTokenizer().decode(d) for d in documents_of(take(batches, 12))[:-1]]
    assert len(documents) > 6 and len(set(documents)) == 3


def test_hf_tokenizer_directory_wraps_documents_with_its_bos_and_eos(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the lazy dog jumps")
    batches = PackedBatches(DataConfig(source=str(corpus), tokenizer=str(tmp_path), seq_len=4, batch_size=1))
    assert isinstance(batches.tokenizer, HFTokenizer) and batches.vocab_size == tokenizer.get_vocab_size()
    ids = tokenizer.encode("the lazy dog jumps").ids
    batch = next(batches)
    assert batch["input_ids"][0].tolist() == [1, *ids][:4]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 0),
        ("batch_size", -1),
        ("batch_size", 2.0),
        ("seed", -3),
        ("max_documents", 0),
        ("validation_fraction", 1.0),
        ("validation_fraction", "0.1"),
        ("source", ""),
        ("tokenizer", None),
    ],
)
def test_invalid_config_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**{field: value})


def test_bad_sources_and_splits_are_named(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        PackedBatches(DataConfig(), split="test")
    with pytest.raises(ConfigError, match="validation_fraction"):
        PackedBatches(DataConfig(), split="validation")
    with pytest.raises(FileNotFoundError, match="missing"):
        PackedBatches(DataConfig(source=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="tokenizer"):
        PackedBatches(DataConfig(tokenizer=str(tmp_path)))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="suffix"):
        PackedBatches(DataConfig(source=str(tmp_path / "table.csv")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no documents in {empty}"):
        PackedBatches(DataConfig(source=str(empty)))
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=f"no documents with text in {empty}"):
        PackedBatches(DataConfig(source=str(empty)))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        PackedBatches(DataConfig(source=str(tmp_path / "empty.jsonl")))
