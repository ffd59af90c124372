"""Report text: the corpus (empty reports, ``<case_id>.txt``), the BPE tokenizer, encoding and whole-word masking."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmodal.data.case import CaseRecord, DataError
from medmodal.data.phantom import generate_phantom_cases
from medmodal.data.text import (
    SPECIAL_TOKENS,
    collect_reports,
    encode_texts,
    is_empty_report,
    load_text_tokenizer,
    save_text_tokenizer,
    special_token_ids,
    train_text_tokenizer,
    whole_word_mask,
)

EXTRA = ("No mass identified; normal ventricles. Impression: unremarkable.",
         "Right frontal lesion, 3.2 mL, with oedema. Impression: high-grade pattern, re-image in 6 weeks.")


@pytest.fixture(scope="module")
def phantom_texts() -> tuple[str, ...]:
    cases = generate_phantom_cases(cases=24, seed=3, spatial_dims=2, size=17)
    return collect_reports(cases, dataset="phantom").texts + EXTRA


@pytest.fixture(scope="module")
def tokenizer(phantom_texts):
    return train_text_tokenizer(phantom_texts, vocab_size=150, min_frequency=2)


# -- the corpus -------------------------------------------------------------------------------------------------


def test_phantom_reports_are_the_corpus() -> None:
    cases = list(generate_phantom_cases(cases=5, seed=1, spatial_dims=2, size=17))
    corpus = collect_reports(cases, dataset="phantom")
    assert corpus.case_ids == tuple(c.case_id for c in cases)
    assert corpus.texts == tuple(c.report for c in cases)
    assert corpus.dropped == 0 and corpus.from_files == 0
    assert corpus.summary() == "reports of 'phantom': 5"


def test_empty_reports_are_dropped_and_counted() -> None:
    reports = {"a": None, "b": "", "c": "  \n ", "d": "nan", "e": "NaN nan", "f": float("nan"), "g": "None",
               "h": "  Left frontal mass.  ", "i": "N/A", "j": "Nan-like but real: nandrolone."}
    records = [CaseRecord(k, {}, report=v) for k, v in reports.items()]  # type: ignore[arg-type]
    corpus = collect_reports(records, dataset="mimic")
    assert corpus.case_ids == ("h", "j")
    assert corpus.texts == ("Left frontal mass.", "Nan-like but real: nandrolone.")
    assert corpus.dropped_ids == ("a", "b", "c", "d", "e", "f", "g", "i")
    assert corpus.dropped == 8
    assert "8 empty reports dropped (a, b, c, d, e, ...)" in corpus.summary()
    assert not is_empty_report("no") and is_empty_report("<NA>")


def test_empty_corpus_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"^mimic-cxr: no report text .* none of its 2 cases .*'report' column"):
        collect_reports([CaseRecord("a", {}, report="nan"), CaseRecord("b", {})], dataset="mimic-cxr")
    with pytest.raises(DataError, match="^empty-set: no report text .* it has no cases"):
        collect_reports([], dataset="empty-set")
    with pytest.raises(DataError, match="case id 'a' appears twice"):
        collect_reports([CaseRecord("a", {}, report="x"), CaseRecord("a", {}, report="y")], dataset="d")


def test_txt_beside_the_images(tmp_path: Path) -> None:
    def case(case_id: str, *folders: str, report: str | None = None) -> CaseRecord:
        images = {}
        for m, folder in zip(("t1", "flair"), folders, strict=False):
            (tmp_path / folder).mkdir(exist_ok=True)
            images[m] = tmp_path / folder / f"{case_id}_{m}.nii.gz"
        return CaseRecord(case_id, images, report=report)

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "a.txt").write_bytes("\ufeffOedema, left. Café.\n".encode())  # a BOM is not text
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.txt").write_text("from the file", encoding="utf-8")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "c.txt").write_text(" nan \n", encoding="utf-8")
    (tmp_path / "flair").mkdir()
    (tmp_path / "flair" / "d.txt").write_text("found in the second modality's folder", encoding="utf-8")
    records = [case("a", "a"), case("b", "b", report="the field wins"), case("c", "c"), case("d", "t1", "flair"),
               case("e", "e")]
    corpus = collect_reports(records, dataset="folders")
    assert dict(zip(corpus.case_ids, corpus.texts, strict=True)) == {
        "a": "Oedema, left. Café.", "b": "the field wins", "d": "found in the second modality's folder"}
    assert corpus.from_files == 2 and corpus.dropped_ids == ("c", "e")
    assert collect_reports(records, dataset="folders", read_txt=False).case_ids == ("b",)

    (tmp_path / "e" / "e.txt").write_bytes("r\xe9sum\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"e\.txt: the report is not UTF-8 text .*save it as UTF-8"):
        collect_reports(records, dataset="folders")


def test_txt_in_a_brats_case_folder(tmp_path: Path) -> None:
    from medmodal.data.formats.brats import read_brats, write_brats
    from medmodal.data.phantom import phantom_info

    cases = list(generate_phantom_cases(cases=2, seed=0, spatial_dims=2, size=17))
    cases[1].report = None
    write_brats(cases, tmp_path / "brats", phantom_info())
    (tmp_path / "brats" / cases[1].case_id / f"{cases[1].case_id}.txt").write_text("Text file report.")
    _, records = read_brats(tmp_path / "brats")  # the reader ignores the .txt (not a modality file)
    corpus = collect_reports(records, dataset="brats")
    assert corpus.texts == (cases[0].report, "Text file report.") and corpus.from_files == 1


# -- the tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_layout(tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 40 < tokenizer.get_vocab_size() <= 150
    encoding = tokenizer.encode("Impression: HIGH-grade  pattern ✓")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert "impression" in encoding.tokens and ":" in encoding.tokens  # lower-cased, punctuation split off
    assert encoding.tokens[-2] == "[UNK]"  # a character never seen in training


def test_tokenizer_is_deterministic(phantom_texts, tokenizer) -> None:
    again = train_text_tokenizer(phantom_texts, vocab_size=150, min_frequency=2)
    assert again.to_str() == tokenizer.to_str()
    shuffled = list(phantom_texts)
    random.Random(0).shuffle(shuffled)
    assert train_text_tokenizer(shuffled, vocab_size=150, min_frequency=2).get_vocab() == tokenizer.get_vocab()
    # a fresh process (another hash seed; huggingface/tokenizers#1794 broke this for marked sub-words)
    code = ("import json, sys; from medmodal.data.text import train_text_tokenizer; "
            "print(train_text_tokenizer(json.loads(sys.stdin.read()), vocab_size=150, min_frequency=2).to_str())")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(phantom_texts)), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == tokenizer.to_str()
    fewer = train_text_tokenizer(phantom_texts, vocab_size=60, min_frequency=2)
    assert fewer.get_vocab_size() == 60


def test_tokenizer_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_text_tokenizer(["a b"], vocab_size=5)
    with pytest.raises(ValueError, match="every text is empty"):
        train_text_tokenizer(["", "  "])


def test_save_load_round_trip(tmp_path: Path, tokenizer, phantom_texts) -> None:
    path = save_text_tokenizer(tokenizer, tmp_path / "run" / "tokenizer.json")
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left
    loaded = load_text_tokenizer(path)
    a = encode_texts(tokenizer, phantom_texts, max_length=29)
    b = encode_texts(loaded, phantom_texts, max_length=29)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.word_ids, b.word_ids)
    assert loaded.get_vocab() == tokenizer.get_vocab()

    with pytest.raises(DataError, match="no such text tokenizer file"):
        load_text_tokenizer(tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text(path.read_text()[:200])
    with pytest.raises(DataError, match=r"corrupt\.json: not a Hugging Face tokenizer\.json"):
        load_text_tokenizer(tmp_path / "corrupt.json")
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[MASK]"]
    del data["model"]["vocab"]["[MASK]"]
    (tmp_path / "no_mask.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"no_mask\.json: has no token \[MASK\]"):
        load_text_tokenizer(tmp_path / "no_mask.json")


# -- encoding ---------------------------------------------------------------------------------------------------


def test_encode_texts(tokenizer) -> None:
    texts = ["Left mass, oedema.", "Synthetic phantom. " * 10, "", "Right  parietal\tmass;necrosis"]
    enc = encode_texts(tokenizer, texts, max_length=13)
    for t in (enc.ids, enc.attention_mask, enc.word_ids):
        assert t.shape == (4, 13) and t.dtype == torch.long
    assert enc.truncated == 1 and len(enc) == 4
    tokens = [tokenizer.id_to_token(i) for i in enc.ids[0].tolist()]
    assert tokens[:7] == ["[CLS]", "left", "mass", ",", "oedema", ".", "[SEP]"]
    assert set(tokens[7:]) == {"[PAD]"}
    assert enc.attention_mask[0].tolist() == [1] * 7 + [0] * 6
    assert enc.word_ids[0].tolist() == [-1, 0, 1, 1, 2, 2, -1] + [-1] * 6  # "mass," and "oedema." are words
    # the cut text keeps its [SEP] and fills the row
    assert enc.attention_mask[1].all() and enc.ids[1, -1] == 3 and enc.ids[1, 0] == 2
    assert enc.ids[2].tolist()[:2] == [2, 3] and enc.attention_mask[2].sum() == 2 and (enc.word_ids[2] == -1).all()
    # white space of any kind separates words; punctuation alone does not
    row3 = [(tokenizer.id_to_token(i), w) for i, w in zip(enc.ids[3].tolist(), enc.word_ids[3].tolist(),
                                                         strict=True) if w >= 0]
    words = {}
    for token, w in row3:
        words.setdefault(w, []).append(token)
    assert ["".join(v) for _, v in sorted(words.items())] == ["right", "parietal", "mass;necrosis"]
    with pytest.raises(ValueError, match="max_length must leave room"):
        encode_texts(tokenizer, texts, max_length=2)
    assert encode_texts(tokenizer, [], max_length=5).ids.shape == (0, 5)


# -- whole-word masking -----------------------------------------------------------------------------------------

V = 97
SPECIAL = (0, 1, 2, 3, 4)


def synthetic_batch(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[CLS]`` + words of 1-4 tokens (ids 5..V-1) + ``[SEP]`` + padding, of random real lengths."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    words = np.full((batch, length), -1, np.int64)
    attention = np.zeros((batch, length), np.int64)
    for b in range(batch):
        real = int(rng.integers(3, length + 1))
        ids[b, 0], pos, w = 2, 1, 0
        while pos < real - 1:
            n = min(int(rng.integers(1, 5)), real - 1 - pos)
            ids[b, pos:pos + n] = rng.integers(5, V, n)
            words[b, pos:pos + n] = w
            pos, w = pos + n, w + 1
        ids[b, real - 1] = 3
        attention[b, :real] = 1
    return torch.from_numpy(ids), torch.from_numpy(words), torch.from_numpy(attention)


def mask(ids, words, attention, seed: int, **kw):
    return whole_word_mask(ids, words, attention, mask_id=4, vocab_size=V, special_ids=SPECIAL,
                           generator=torch.Generator().manual_seed(seed), **kw)


def test_whole_word_mask_invariants() -> None:
    ids, words, attention = synthetic_batch(600, 41, seed=0)
    inputs, labels = mask(ids, words, attention, seed=1)
    chosen = labels != -100
    assert inputs.shape == labels.shape == ids.shape and inputs.dtype == labels.dtype == torch.long
    # labels: the original id exactly at the chosen positions
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    # specials and padding are never chosen, ids stay in the vocabulary
    candidate = (words >= 0) & attention.bool()
    assert not chosen[~candidate].any()
    assert inputs.min() >= 0 and inputs.max() < V
    candidates, budgets, covered = 0, 0, 0
    for b in range(ids.shape[0]):
        n = int(candidate[b].sum())
        budget = max(1, round(n * 0.15)) if n else 0
        got = int(chosen[b].sum())
        lengths = torch.bincount(words[b][candidate[b]])
        picked = torch.bincount(words[b][chosen[b]], minlength=len(lengths))
        # whole words: every sub-token of a word or none of them
        assert bool(((picked == 0) | (picked == lengths)).all()), b
        # the budget is never exceeded, and no unchosen word would still fit (greedy fill)
        assert got <= budget
        unchosen = lengths[(picked == 0) & (lengths > 0)]
        assert bool((got + unchosen > budget).all()), b
        candidates, budgets, covered = candidates + n, budgets + budget, covered + got
    assert 0.14 < covered / candidates < 0.16 and covered > 0.9 * budgets
    # 80 / 10 / 10 over the chosen tokens
    total = int(chosen.sum())
    as_mask = int((inputs[chosen] == 4).sum()) / total
    unchanged = int((inputs[chosen] == ids[chosen]).sum()) / total
    replaced = inputs[chosen & (inputs != 4) & (inputs != ids)]
    assert abs(as_mask - 0.8) < 0.03 and abs(unchanged - 0.1 - 0.1 / (V - 5)) < 0.02
    assert abs(replaced.numel() / total - 0.1) < 0.02
    assert not torch.isin(replaced, torch.tensor(SPECIAL)).any()  # random tokens are never special
    assert len(torch.unique(replaced)) > 40  # drawn across the vocabulary


def test_whole_word_mask_is_seeded() -> None:
    ids, words, attention = synthetic_batch(32, 19, seed=2)
    a, b, c = mask(ids, words, attention, 7), mask(ids, words, attention, 7), mask(ids, words, attention, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_mask_edges() -> None:
    ids, words, attention = synthetic_batch(8, 17, seed=3)
    _, labels = mask(ids, words, attention, 0, p=0.0)
    assert (labels == -100).all()
    inputs, labels = mask(ids, words, attention, 0, p=1.0, mask_prob=1.0, random_prob=0.0)
    candidate = (words >= 0) & attention.bool()
    assert torch.equal(labels != -100, candidate) and (inputs[candidate] == 4).all()
    # rows without text (padding only, or [CLS] [SEP]) choose nothing; [MASK] ids already in the input stay out
    empty = torch.zeros(2, 17, dtype=torch.long)
    _, labels = mask(empty, torch.full_like(empty, -1), empty, 0)
    assert (labels == -100).all()
    ids[:, 1] = 4
    _, labels = mask(ids, words, attention, 0, p=1.0)
    assert (labels[:, 1] == -100).all()
    with pytest.raises(ValueError, match="token ids must lie in"):
        mask(ids + V, words, attention, 0)
    with pytest.raises(ValueError, match="must all be"):
        mask(ids, words[:, :5], attention, 0)


def test_mask_phantom_reports(tokenizer, phantom_texts) -> None:
    enc = encode_texts(tokenizer, phantom_texts, max_length=31)
    specials = special_token_ids(tokenizer)
    inputs, labels = whole_word_mask(enc.ids, enc.word_ids, enc.attention_mask, mask_id=specials.mask,
                                     vocab_size=tokenizer.get_vocab_size(), special_ids=specials.all,
                                     generator=torch.Generator().manual_seed(0), p=0.3)
    chosen = labels != -100
    assert chosen.any(dim=1).all()
    for row in range(len(enc)):
        for w in enc.word_ids[row].unique().tolist():
            if w >= 0:
                in_word = enc.word_ids[row] == w
                assert chosen[row][in_word].all() or not chosen[row][in_word].any()
    assert not chosen[enc.ids == specials.cls].any() and not chosen[enc.ids == specials.pad].any()


def test_a_report_table_without_images_is_a_corpus(tmp_path: Path) -> None:
    """A text-only corpus: MIMIC-style impression + findings joined in that order, empty sections left out, a row
    with no text dropped and counted by collect_reports, ids from study_id, targets kept; bad tables named."""
    from medmodal.data.text import read_report_table

    table = tmp_path / "reports.csv"
    table.write_text("study_id,findings,impression,target\n"
                     "s1,Clear lungs.,No acute disease.,0\n"
                     "s2,nan,Right lower lobe opacity.,1\n"
                     "s3,,nan,\n", encoding="utf-8")
    records = read_report_table(table)
    assert [(r.case_id, r.report, r.target, r.images) for r in records] == [
        ("s1", "No acute disease. Clear lungs.", 0, {}), ("s2", "Right lower lobe opacity.", 1, {}),
        ("s3", None, None, {})]
    corpus = collect_reports(records, dataset="reports")
    assert corpus.case_ids == ("s1", "s2") and corpus.dropped_ids == ("s3",)
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,notes\na,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.csv: a report table needs a column named one of report"):
        read_report_table(bad)
    bad.write_text("case_id,report\na,hello\na,again\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3: case id 'a' appears twice"):
        read_report_table(bad)
    bad.write_text("report,target\nhello,high\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: target 'high' is not an integer class"):
        read_report_table(bad)
