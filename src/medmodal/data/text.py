"""Report text as a modality: the report corpus, a BPE tokenizer and BERT-style whole-word masking.

Continual multi-modal self-supervised pretraining (the continual-pretraining spec) trains on report text with
BERT-style masked language modelling (spec §2.3: whole-word masking, p = 0.15, 80/10/10 replacement,
cross-entropy with ignore index -100) on at most 112 tokens (§2.1). This module holds the data side of such a text
stage, as pure functions (the data layer names no method):

* :func:`collect_reports`: the non-empty reports of a data set's cases (:class:`ReportCorpus`). A case's report is
  its ``report`` field (a manifest's ``report`` column, a BraTS folder's ``metadata.csv`` ``report`` column, the
  phantom's generated one-line report). When that field is empty, ``<case_id>.txt`` (UTF-8) in the folder of one
  of the case's image files is read instead. Empty reports (blank, or only ``nan`` / ``None`` / ``NA`` words, as
  a pandas-made CSV writes them) are dropped and counted, never fed to the tokenizer (spec §6, the ~9 000 empty
  MIMIC-CXR reports of HKU-MedAI/MGCA#42).
* :func:`read_report_table`: a text-only corpus, a CSV of reports (``report``, or MIMIC's ``impression`` and
  ``findings`` sections) without images.
* :func:`train_text_tokenizer`, :func:`save_text_tokenizer`, :func:`load_text_tokenizer`: a byte-pair-encoding
  tokenizer (Hugging Face ``tokenizers``; the paper names a BPE tokenizer, spec §2.7 ``text_tokenizer``) with the
  special tokens ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``. Any ``tokenizer.json`` that has these five
  tokens (at any ids, e.g. a WordPiece BERT tokenizer) loads and works with the functions below.
* :func:`encode_texts`: ``ids``, ``attention_mask`` and ``word_ids``, each ``(N, L) long``, padded to ``L``.
* :func:`whole_word_mask`: the MLM corruption ``(input_ids, labels)`` from an explicit :class:`torch.Generator`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from medmodal.atomic import atomic_write_text
from medmodal.data.case import Case, CaseRecord, DataError

__all__ = ["EMPTY_REPORT_WORDS", "SPECIAL_TOKENS", "EncodedText", "ReportCorpus", "SpecialTokenIds",
           "REPORT_COLUMNS", "REPORT_ID_COLUMNS", "collect_reports", "encode_texts", "is_empty_report",
           "load_text_tokenizer", "read_report_table", "save_text_tokenizer",
           "special_token_ids", "train_text_tokenizer", "whole_word_mask"]

#: The special tokens, in id order for a tokenizer trained by :func:`train_text_tokenizer` (``[PAD]`` is 0).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Words that mean "no report" when a whole report consists of them (compared lower-cased): what pandas writes for
#: a missing value (``nan``, ``<NA>``, ``None``), and ``null`` / ``NA`` / ``N/A``. ``"nan nan"`` (two empty
#: sections joined) is empty too.
EMPTY_REPORT_WORDS: frozenset[str] = frozenset({"nan", "none", "null", "na", "n/a", "<na>"})
_WORD = re.compile(r"\S+")
_FILE_NAME_UNSAFE = re.compile(r'[/\\:*?"<>|\0]')


# --------------------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportCorpus:
    """The non-empty reports of a data set, in the order of its cases.

    Args:
        dataset: the data set's name, for messages.
        case_ids: ``(N,)`` the case of each report.
        texts: ``(N,)`` the reports, stripped of leading and trailing white space.
        dropped_ids: the cases whose report was empty (blank or only :data:`EMPTY_REPORT_WORDS`) or absent; the
            caller logs :meth:`summary`.
        from_files: how many of ``texts`` were read from a ``<case_id>.txt`` file.
    """

    dataset: str
    case_ids: tuple[str, ...]
    texts: tuple[str, ...]
    dropped_ids: tuple[str, ...] = ()
    from_files: int = 0

    def __post_init__(self) -> None:
        if len(self.case_ids) != len(self.texts):
            raise ValueError(f"{len(self.case_ids)} case ids but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dropped(self) -> int:
        """How many cases had an empty or no report."""
        return len(self.dropped_ids)

    def summary(self) -> str:
        """One line for the log, e.g. ``"reports of 'mimic': 120 (15 from <case_id>.txt files); 9 empty
        reports dropped (a, b, c, ...)"``."""
        line = f"reports of {self.dataset!r}: {len(self)}"
        if self.from_files:
            line += f" ({self.from_files} from <case_id>.txt files)"
        if self.dropped:
            shown = ", ".join(self.dropped_ids[:5]) + (", ..." if self.dropped > 5 else "")
            line += f"; {self.dropped} empty report{'s' if self.dropped != 1 else ''} dropped ({shown})"
        return line


def is_empty_report(text: object) -> bool:
    """Whether a report value holds no text: ``None``, a float NaN, blank, or only :data:`EMPTY_REPORT_WORDS`."""
    if text is None:
        return True
    if isinstance(text, float) and math.isnan(text):
        return True
    return all(word.lower() in EMPTY_REPORT_WORDS for word in str(text).split())


def _image_folders(record: CaseRecord | Case) -> list[Path]:
    """The folders holding the case's image files, in the record's modality order (then its label's)."""
    paths: list[Path] = []
    for value in [*record.images.values(), record.label]:
        path = value if isinstance(value, str | Path) else getattr(value, "path", None)
        if path is not None:
            paths.append(Path(path).parent)
    return list(dict.fromkeys(paths))


def _read_txt(record: CaseRecord | Case) -> str | None:
    """The text of the first ``<case_id>.txt`` in :func:`_image_folders`, or ``None`` when there is none."""
    if _FILE_NAME_UNSAFE.search(record.case_id) or record.case_id.startswith("."):
        return None
    for folder in _image_folders(record):
        path = folder / f"{record.case_id}.txt"
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: the report is not UTF-8 text ({err.reason} at byte {err.start}); "
                                "save it as UTF-8") from err
            except OSError as err:
                raise DataError(f"{path}: cannot read the report ({err.strerror}); check its permissions") from err
    return None


#: The columns of a report table that hold text, joined in this order when several are present (MIMIC-CXR's
#: sections as MGCA's CSV has them: "impression + findings", spec §2.6).
REPORT_COLUMNS: tuple[str, ...] = ("report", "impression", "findings", "text")
#: The columns of a report table that name a case (the first present one; the row number otherwise).
REPORT_ID_COLUMNS: tuple[str, ...] = ("case_id", "study_id", "id")


def read_report_table(path: Path | str) -> list[CaseRecord]:
    """The reports of a CSV table without images (a text-only corpus): one :class:`CaseRecord` per row, with no
    images and the row's text as its ``report``.

    The text is the row's :data:`REPORT_COLUMNS` that the header has, joined with a space in that order (empty or
    ``nan`` sections left out, so a row whose sections are all empty has an empty report, which
    :func:`collect_reports` drops and counts); the case id is its first :data:`REPORT_ID_COLUMNS` column, else
    ``row<k>``; an optional ``target`` column (an integer class) is kept for probes.

    Raises:
        DataError: a missing or unreadable file, no text column, an empty or duplicate case id, a non-integer target.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: report table not found")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a UTF-8 CSV table ({err})") from None
    text_cols = [c for c in REPORT_COLUMNS if c in header]
    if not text_cols:
        raise DataError(f"{path}: a report table needs a column named one of {', '.join(REPORT_COLUMNS)}; its "
                        f"header is {', '.join(header) or 'empty'}")
    id_col = next((c for c in REPORT_ID_COLUMNS if c in header), None)
    records, seen = [], set()
    for k, row in enumerate(rows, start=2):  # line numbers of the file (the header is line 1)
        case_id = (row.get(id_col) or "").strip() if id_col else f"row{k - 1}"
        if not case_id:
            raise DataError(f"{path}, line {k}: empty {id_col}; give every report a case id")
        if case_id in seen:
            raise DataError(f"{path}, line {k}: case id {case_id!r} appears twice")
        seen.add(case_id)
        parts = [str(row.get(c) or "").strip() for c in text_cols]
        text = " ".join(t for t in parts if t and not is_empty_report(t))
        target = (row.get("target") or "").strip()
        try:
            value = int(target) if target else None
        except ValueError:
            raise DataError(f"{path}, line {k}: target {target!r} is not an integer class") from None
        records.append(CaseRecord(case_id, {}, target=value, report=text or None))
    return records


def collect_reports(records: Iterable[CaseRecord | Case], *, dataset: str, read_txt: bool = True) -> ReportCorpus:
    """Collect the report of every case that has one (a text stage's data, continual-pretraining spec §2.6).

    The rule: a case's report is its ``report`` field when that is not empty (:func:`is_empty_report`); otherwise,
    with ``read_txt``, the UTF-8 file ``<case_id>.txt`` in the folder of one of its image files (tried in the
    record's modality order, then the label's folder; the first one found wins; a BraTS case folder
    ``root/<case>/`` holds ``<case>.txt``, an nnU-Net data set ``imagesTr/<case>.txt``). A field that is not empty
    always wins over a file. A case whose report is still empty is dropped and counted
    (:attr:`ReportCorpus.dropped_ids`), so a CSV with missing sections (spec §6, HKU-MedAI/MGCA#42) trains on the
    rest instead of on ``"nan"``.

    Args:
        records: the data set's cases (what a format reader returns, or in-memory :class:`Case` objects such as the
            phantom's; a case without image paths has no ``.txt`` to read).
        dataset: the data set's name (or path), for messages.
        read_txt: whether to look for ``<case_id>.txt`` files.

    Raises:
        DataError: a case id appears twice; a ``.txt`` file is not UTF-8; no case has a report.
    """
    case_ids: list[str] = []
    texts: list[str] = []
    dropped: list[str] = []
    seen: set[str] = set()
    from_files = 0
    for record in records:
        if record.case_id in seen:
            raise DataError(f"{dataset}: case id {record.case_id!r} appears twice; report case ids must be unique")
        seen.add(record.case_id)
        text = record.report
        if is_empty_report(text) and read_txt:
            text = _read_txt(record)
            from_files += not is_empty_report(text)
        if is_empty_report(text):
            dropped.append(record.case_id)
            continue
        case_ids.append(record.case_id)
        texts.append(str(text).strip())
    if not texts:
        found = (f"none of its {len(dropped)} cases has a report ({len(dropped)} empty or absent)" if dropped
                 else "it has no cases")
        raise DataError(f"{dataset}: no report text to train on: {found}; give each case a report (the 'report' "
                        "column of a manifest or of metadata.csv, or a UTF-8 <case_id>.txt file beside the "
                        "case's images)")
    return ReportCorpus(dataset=dataset, case_ids=tuple(case_ids), texts=tuple(texts), dropped_ids=tuple(dropped),
                        from_files=from_files)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids of a tokenizer's special tokens (:data:`SPECIAL_TOKENS`)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @property
    def all(self) -> tuple[int, ...]:
        """Every special id, for :func:`whole_word_mask`'s ``special_ids``."""
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def special_token_ids(tokenizer: Tokenizer, *, where: str = "the text tokenizer") -> SpecialTokenIds:
    """The ids of ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]`` and ``[MASK]``; :class:`DataError` if one is missing."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise DataError(f"{where}: has no token {', '.join(missing)}; a text tokenizer needs all of "
                        f"{list(SPECIAL_TOKENS)} (train one with train_text_tokenizer)")
    pad, unk, cls, sep, mask = (int(ids[token]) for token in SPECIAL_TOKENS)  # type: ignore[arg-type]
    return SpecialTokenIds(pad=pad, unk=unk, cls=cls, sep=sep, mask=mask)


def train_text_tokenizer(texts: Iterable[str], *, vocab_size: int = 30_000, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-pair-encoding tokenizer on report texts.

    The pipeline: NFKC + lower-case normaliser; pre-tokens split at white space and at every punctuation character
    (``"rim;"`` is ``rim`` + ``;``); a plain BPE model (no end-of-word or continuing-sub-word marker); special
    tokens :data:`SPECIAL_TOKENS` at ids 0-4; and a post-processor that wraps a text as ``[CLS] ... [SEP]`` (a
    pair as ``[CLS] a [SEP] b [SEP]``). Characters never seen in training encode as ``[UNK]``. Without word markers
    :meth:`~tokenizers.Tokenizer.decode` separates every token by a space; :func:`encode_texts` gives the word of
    each token.

    Training is deterministic: BPE merges the most frequent pair, ties broken by the pair's ids, and the alphabet
    is sorted before ids are given, so the same texts (in any order) give the same vocabulary and merges in every
    process; there is no seed. The markers are left out because they break this: ``tokenizers``' BPE trainer
    gives the marked sub-word tokens ids in hash-map order, which differs between processes and, through the tie
    break, changes the merges (huggingface/tokenizers#1794, unfixed in 0.23; a test trains in two processes).

    Args:
        texts: the corpus, e.g. :attr:`ReportCorpus.texts`.
        vocab_size: the most tokens (specials and single characters included); a small corpus stops earlier, when
            no pair occurs ``min_frequency`` times.
        min_frequency: a pair is merged only if it occurs at least this often.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    texts = [str(t) for t in texts]
    if not any(t.strip() for t in texts):
        raise ValueError("no text to train the tokenizer on (every text is empty)")
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ids = special_token_ids(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids.cls), ("[SEP]", ids.sep)])
    return tokenizer


def save_text_tokenizer(tokenizer: Tokenizer, path: Path | str) -> Path:
    """Write ``tokenizer`` as one ``tokenizer.json`` file (Hugging Face format), atomically."""
    return atomic_write_text(path, tokenizer.to_str(pretty=True))


def load_text_tokenizer(path: Path | str) -> Tokenizer:
    """Read a tokenizer written by :func:`save_text_tokenizer` (or any ``tokenizer.json`` with the special tokens).

    Raises:
        DataError: the file is missing, is not a Hugging Face tokenizer, or lacks one of :data:`SPECIAL_TOKENS`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such text tokenizer file; train one (train_text_tokenizer + "
                        "save_text_tokenizer) or give the path of a tokenizer.json")
    try:
        tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for any parse error
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({err}); re-save it with "
                        "save_text_tokenizer or train a new one") from err
    special_token_ids(tokenizer, where=str(path))
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedText:
    """Token ids of ``N`` texts padded to ``L`` (what :func:`encode_texts` returns).

    Args:
        ids: ``(N, L) long`` token ids, ``[CLS] ... [SEP]`` then ``[PAD]``.
        attention_mask: ``(N, L) long``, 1 for real tokens (specials included), 0 for padding.
        word_ids: ``(N, L) long``, the index of the white-space separated word of the original text that each
            token comes from (``"mass,"`` is one word of two tokens), -1 for special tokens and padding; the
            groups of :func:`whole_word_mask`.
        truncated: how many texts were longer than ``L`` tokens and were cut (their ``[SEP]`` kept); the caller
            logs it.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor
    truncated: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], *, max_length: int) -> EncodedText:
    """Tokenise ``texts`` and pad (or cut) each to ``max_length`` tokens (112 in the continual-pretraining spec, §2.1).

    ``tokenizer`` is not changed (its truncation and padding are set on a copy), so encode a data set in one call
    rather than per batch.

    Returns:
        :class:`EncodedText` with ``(N, max_length)`` tensors.
    """
    specials = special_token_ids(tokenizer)
    added = tokenizer.num_special_tokens_to_add(False)
    if max_length <= added:
        raise ValueError(f"max_length must leave room for a token beside the {added} special tokens, got "
                         f"{max_length}")
    texts = list(texts)
    n = len(texts)
    ids = np.full((n, max_length), specials.pad, dtype=np.int64)
    attention = np.zeros((n, max_length), dtype=np.int64)
    word_ids = np.full((n, max_length), -1, dtype=np.int64)
    if n == 0:
        empty = torch.from_numpy(ids)
        return EncodedText(ids=empty, attention_mask=empty.clone(), word_ids=empty.clone(), truncated=0)
    worker = Tokenizer.from_str(tokenizer.to_str())
    worker.enable_truncation(max_length=max_length)
    worker.enable_padding(pad_id=specials.pad, pad_token="[PAD]", length=max_length)
    truncated = 0
    for row, (text, encoding) in enumerate(zip(texts, worker.encode_batch(texts), strict=True)):
        truncated += bool(encoding.overflowing)
        ids[row] = encoding.ids
        attention[row] = encoding.attention_mask
        starts = np.array([m.start() for m in _WORD.finditer(text)], dtype=np.int64)
        token_starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
        words = np.searchsorted(starts, token_starts, side="right") - 1
        regular = (np.array(encoding.special_tokens_mask) == 0) & (np.array(encoding.attention_mask) == 1)
        word_ids[row] = np.where(regular & (words >= 0), words, -1)
    return EncodedText(ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention),
                       word_ids=torch.from_numpy(word_ids), truncated=truncated)


# --------------------------------------------------------------------------------------------------------------
# Whole-word masking
# --------------------------------------------------------------------------------------------------------------


def whole_word_mask(
    ids: torch.Tensor,
    word_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    generator: torch.Generator,
    p: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT whole-word masking for masked language modelling (continual-pretraining spec §2.3).

    What is implemented, per sequence (the semantics of BERT's ``create_masked_lm_predictions`` and Hugging Face's
    ``DataCollatorForWholeWordMask``, vectorised over the batch):

    1. The candidates are the tokens with ``word_ids >= 0``, ``attention_mask == 1`` and an id not in
       ``special_ids``; a word is the group of candidates sharing a word id. Specials and padding are never
       chosen.
    2. The budget is ``max(1, round(p * n))`` tokens, ``n`` the number of candidates (0 when ``n = 0`` or
       ``p = 0``; ``round`` halves to even, as Python's). Hugging Face counts ``[CLS]`` and ``[SEP]`` in
       ``n``; here only the candidates count, so about ``p`` of the real text tokens are chosen.
    3. The words are visited in a uniformly random order; a word is chosen (all its tokens) if it still fits the
       budget, else skipped, and later shorter words may still fit. So whole words only, never more tokens than
       the budget, and fewer only when no remaining word fits.
    4. Each chosen token, independently: with probability ``mask_prob`` (0.8) it becomes ``mask_id``, with
       ``random_prob`` (0.1) a token drawn uniformly from the non-special ids of ``[0, vocab_size)`` (Hugging Face
       draws from the whole vocabulary, specials included), else it is left unchanged.

    Args:
        ids: ``(B, L) long`` token ids, all in ``[0, vocab_size)``.
        word_ids: ``(B, L) long`` word index per token, -1 for none (:attr:`EncodedText.word_ids`).
        attention_mask: ``(B, L)`` bool or long, 1 for real tokens.
        mask_id: the ``[MASK]`` id.
        vocab_size: the number of token ids (``tokenizer.get_vocab_size()``).
        special_ids: ids never chosen and never drawn as random replacements (:attr:`SpecialTokenIds.all`).
        generator: every draw comes from it (three draws, always in the same order), on ``ids``' device.
        p: the fraction of candidate tokens to choose.
        mask_prob, random_prob: the replacement split of the chosen tokens.

    Returns:
        ``input_ids (B, L) long``: the corrupted ids; ``labels (B, L) long``: the original id at the chosen
        positions, -100 elsewhere (cross-entropy's ignore index).
    """
    if ids.ndim != 2 or word_ids.shape != ids.shape or attention_mask.shape != ids.shape:
        raise ValueError(f"ids, word_ids and attention_mask must all be (B, L), got {tuple(ids.shape)}, "
                         f"{tuple(word_ids.shape)}, {tuple(attention_mask.shape)}")
    if not 0.0 <= p <= 1.0 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1.0:
        raise ValueError(f"need 0 <= p <= 1 and mask_prob, random_prob >= 0 with a sum <= 1, got p={p}, "
                         f"mask_prob={mask_prob}, random_prob={random_prob}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    device = ids.device
    special = torch.as_tensor(list(special_ids), dtype=torch.long, device=device)
    candidate = (word_ids >= 0) & attention_mask.bool() & ~torch.isin(ids, special)
    word = torch.where(candidate, word_ids, torch.zeros_like(word_ids))
    n_words = int(word.max()) + 1 if word.numel() else 1
    batch = ids.shape[0]

    # 1-3: word lengths, random word order, greedy fill of the token budget.
    lengths = torch.zeros(batch, n_words, dtype=torch.long, device=device)
    lengths.scatter_add_(1, word, candidate.long())
    n = candidate.sum(dim=1)
    budget = torch.round(n.double() * p).long()  # float64: the same halves as Python round(n * p)
    if p > 0:
        budget = torch.where(n > 0, budget.clamp(min=1), budget)
    keys = torch.rand(batch, n_words, generator=generator, device=device)
    order = torch.argsort(keys, dim=1, stable=True)
    sorted_lengths = lengths.gather(1, order)
    covered = torch.zeros(batch, dtype=torch.long, device=device)
    taken_sorted = torch.zeros(batch, n_words, dtype=torch.bool, device=device)
    for k in range(n_words):
        size = sorted_lengths[:, k]
        take = (size > 0) & (covered + size <= budget)
        covered = covered + size * take
        taken_sorted[:, k] = take
    taken = torch.zeros_like(taken_sorted).scatter_(1, order, taken_sorted)
    chosen = candidate & taken.gather(1, word)

    # 4: 80/10/10 replacement of the chosen tokens.
    u = torch.rand(ids.shape, generator=generator, device=device)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    pool = allowed.nonzero().squeeze(1)
    if pool.numel() == 0:
        raise ValueError(f"every id of the vocabulary of {vocab_size} is special; nothing to draw from")
    random_ids = pool[torch.randint(pool.numel(), ids.shape, generator=generator, device=device)]
    input_ids = torch.where(chosen & (u < mask_prob), torch.full_like(ids, mask_id), ids)
    input_ids = torch.where(chosen & (u >= mask_prob) & (u < mask_prob + random_prob), random_ids, input_ids)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return input_ids, labels
