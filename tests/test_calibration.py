"""Calibration loader: file types, packing vs truncation, seeds, chat templates, hub path, cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from quantkit.calibration import TextRequest, cache_dir, load_documents, load_tokens, split_play
from quantkit.errors import CalibrationError


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture()
def rows():
    return [{"text": f"document number {i} " + "words and more words " * (i % 7 + 1), "id": i} for i in range(30)]


def _write(path, rows):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    {".jsonl": lambda: ds.to_json(str(path)), ".csv": lambda: ds.to_csv(str(path), index=False),
     ".parquet": lambda: ds.to_parquet(str(path))}[path.suffix]()
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_tabular_files_give_the_same_documents(tmp_path, rows, suffix):
    path = _write(tmp_path / f"data{suffix}", rows)
    assert load_documents(TextRequest(str(path), 4, 32)) == [r["text"] for r in rows]


def test_txt_file_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird")
    docs = load_documents(TextRequest(str(path), 4, 32))
    assert [d.strip() for d in docs] == ["first paragraph\nstill first", "second one", "third"]


def test_packing_gives_full_windows_of_the_concatenated_stream(tmp_path, rows, tok):
    path = _write(tmp_path / "d.jsonl", rows)
    seqs = load_tokens(TextRequest(str(path), 5, 24, packing=True, shuffle=False), tok)
    assert [len(s) for s in seqs] == [24] * 5
    stream = []
    for r in rows:
        stream += tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    width = 24 - 1  # BOS first
    for i, s in enumerate(seqs):
        assert s[0].item() == tok.bos_token_id
        assert s[1:].tolist() == stream[i * width:(i + 1) * width]


def test_truncation_keeps_one_document_per_sequence(tmp_path, rows, tok):
    path = _write(tmp_path / "d.jsonl", rows)
    seqs = load_tokens(TextRequest(str(path), 6, 12, packing=False, shuffle=False), tok)
    for r, s in zip(rows, seqs):
        ids = tok(r["text"], add_special_tokens=False)["input_ids"][:11]
        assert s.tolist() == [tok.bos_token_id] + ids


def test_seed_decides_the_sample_and_is_deterministic(tmp_path, rows, tok):
    path = _write(tmp_path / "d.jsonl", rows)
    a = load_tokens(TextRequest(str(path), 8, 16, packing=False, seed=1), tok)
    b = load_tokens(TextRequest(str(path), 8, 16, packing=False, seed=1), tok)
    c = load_tokens(TextRequest(str(path), 8, 16, packing=False, seed=2), tok)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))


def test_chat_messages_are_formatted_with_the_template(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": conv}) + "\n")
    docs = load_documents(TextRequest(str(path), 1, 64, messages_column="messages"), tok)
    assert docs == [tok.apply_chat_template(conv, tokenize=False)]
    assert "<|user|>hi there</s>" in docs[0]


def test_shipped_chat_set_is_project_text(tok):
    docs = load_documents(TextRequest("quantkit-chat", 4, 64), tok)
    assert len(docs) == 10 and all("<|assistant|>" in d for d in docs)


def test_hub_dataset_code_path_offline_with_a_local_dataset_folder(tmp_path, rows):
    """A dataset id goes through datasets.load_dataset(id, subset, split): a local folder is one."""
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    _write(folder / "data" / "train.jsonl", rows[:10])
    _write(folder / "data" / "test.jsonl", rows[10:20])
    docs = load_documents(TextRequest(str(folder), 4, 32, split="test"))
    assert docs == [r["text"] for r in rows[10:20]]


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationError) as e:
        load_documents(TextRequest("nobody/no-such-dataset", 4, 32))
    assert (e.value.field, e.value.value, e.value.file) == ("calibration.source", "nobody/no-such-dataset", None)


def test_tokenization_is_cached_by_its_inputs(tmp_path, rows, tok):
    path = _write(tmp_path / "d.jsonl", rows)
    before = set((cache_dir() / "tokens").glob("*")) if (cache_dir() / "tokens").exists() else set()
    req = TextRequest(str(path), 4, 16)
    first = load_tokens(req, tok)
    files = set((cache_dir() / "tokens").glob("*")) - before
    assert len(files) == 1
    (cached,) = files
    from safetensors.torch import load_file, save_file

    # The second call must read the cache: poison it and see the poison come back.
    data = load_file(str(cached))
    data["s0"] = torch.full_like(data["s0"], 7)
    save_file(data, str(cached))
    assert load_tokens(req, tok)[0].tolist() == [7] * len(first[0])
    load_tokens(TextRequest(str(path), 4, 16, seed=5), tok)  # another key: another file
    assert len(set((cache_dir() / "tokens").glob("*")) - before) == 2


def test_fewer_sequences_than_asked_warns_and_continues(tmp_path, tok, caplog):
    path = tmp_path / "small.jsonl"
    path.write_text(json.dumps({"text": "just a few words here"}) + "\n")
    seqs = load_tokens(TextRequest(str(path), 5, 64, packing=False), tok)
    assert len(seqs) == 1
    assert "gave 1 sequences of the 5 asked for" in caplog.text


def test_self_generated_source_samples_from_the_model(tiny_llama, tok):
    from quantkit.selfgen import sample_from_model

    def sample(seed):
        return sample_from_model(tiny_llama, torch.float32, torch.device("cpu"), 3, 20, seed=seed)

    a = sample(3)
    torch.manual_seed(1234)  # the global RNG neither decides the draw ...
    b = sample(3)
    state = torch.get_rng_state()
    c = sample(4)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor is drawn from
    assert [len(s) for s in a] == [20] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(s.tolist()) for s in a}) == 3
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_play_markdown_becomes_plain_scenes():
    md = "# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter HAMLET_\n\n**HAMLET**  \n" + "To be, or not to be.  \n" * 20
    (scene,) = split_play(md)
    assert scene.startswith("(Enter HAMLET)\n\nHAMLET: To be, or not to be.")
    assert "**" not in scene and "#" not in scene


def test_safetensors_token_file_is_used_as_is(tmp_path, tok):
    from safetensors.torch import save_file

    ids = torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    seqs = load_tokens(TextRequest(str(tmp_path / "ids.safetensors"), 3, 10), tok)
    assert [s.tolist() for s in seqs] == ids[:3, :10].tolist()
    assert all(s.dtype == torch.long for s in seqs)
    save_file({"s0": ids[0], "s1": ids[1, :7]}, str(tmp_path / "cache.safetensors"))
    seqs = load_tokens(TextRequest(str(tmp_path / "cache.safetensors"), 8, 12), None)
    assert [s.tolist() for s in seqs] == [ids[0].tolist(), ids[1, :7].tolist()]


def test_safetensors_token_file_of_floats_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(2, 4)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CalibrationError) as e:
        load_tokens(TextRequest(str(tmp_path / "f.safetensors"), 2, 4), None)
    assert (e.value.field, e.value.file) == ("calibration.source", str(tmp_path / "f.safetensors"))
    assert "integer tensor 'input_ids'" in e.value.message  # says what the file must hold
    with pytest.raises(CalibrationError) as e:
        load_tokens(TextRequest(str(tmp_path / "missing.safetensors"), 2, 4), None)
    assert (e.value.field, e.value.file) == ("calibration.source", str(tmp_path / "missing.safetensors"))
