"""GLUE data: the task table, loading (from the Hub or a local directory), tokenization and a
dynamic-padding collate function.

``datasets`` and ``transformers`` are imported inside the functions that need them, never at import
time.

Local data (``load_glue(task, data_dir)``) is either

* a ``DatasetDict`` written by ``DatasetDict.save_to_disk`` (a directory with ``dataset_dict.json``), or
* a directory with one file per split, named ``<split>.<ext>`` with ``ext`` one of ``csv``, ``tsv``,
  ``json``, ``jsonl`` (``dev`` is accepted for ``validation``, ``dev_matched`` / ``dev_mismatched``
  for MNLI's), in one of two layouts, told apart by the header:

  - the column names of the Hugging Face GLUE dataset (``GLUE_TASKS[task].columns``: e.g.
    ``sentence``/``label`` for SST-2, ``premise``/``hypothesis``/``label`` for MNLI), or
  - the original GLUE TSVs as the GLUE download gives them (``ORIGINAL_LAYOUTS``): CoLA without a
    header (source, label, original label, sentence), MRPC's ``Quality``/``#1 String``/``#2 String``,
    QQP's ``question1``/``question2``/``is_duplicate``, STS-B's ``sentence1``/``sentence2``/``score``,
    MNLI's ``sentence1``/``sentence2``/``gold_label``; SST-2, QNLI, RTE and WNLI already use the
    Hugging Face names. They are mapped to the Hugging Face columns and label ids exactly as the
    Hugging Face ``glue`` loader maps them (MNLI: entailment 0, neutral 1, contradiction 2; QNLI, RTE:
    entailment 0, not_entailment 1; the other tasks' labels are the files' 0/1, STS-B's score a
    float), ``idx`` is the row number, and rows with missing fields (a few in QQP's train.tsv) are
    skipped with a warning, as that loader drops them.

Either may also sit in a sub-directory named after the task (``data_dir/mnli/...``), so one
``data_dir`` can hold all tasks.

File formats: CSV is read with standard quoting (as ``pandas.to_csv`` / ``csv.writer`` write it);
TSV with NO quoting, as the original GLUE files are written (a field cannot hold a tab or a
newline; quotes are kept literally); JSONL holds one object per line; JSON an array of objects or
an object of equal-length column arrays. Labels may be class ids or the class names of
``GLUE_TASKS[task].label_names`` (numbers for STS-B). Other columns are dropped, except ``idx``,
which is made up (row number) when absent.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GLUE_TASKS",
    "ORIGINAL_LAYOUTS",
    "GlueCollator",
    "GlueTask",
    "collate_glue",
    "glue_collator",
    "glue_task",
    "load_glue",
    "tokenize_glue",
]

HUB_DATASET = "nyu-mll/glue"
FILE_EXTENSIONS = ("csv", "tsv", "json", "jsonl")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as the Hugging Face ``nyu-mll/glue`` dataset lays it out."""

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    train_split: str = "train"

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Classes, or 1 for the regression task (STS-B): ``from_pretrained(..., num_labels=...)``."""
        return len(self.label_names) or 1

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a local file must have."""
        return self.text_fields + ("label",)

    @property
    def splits(self) -> tuple[str, ...]:
        """Train and validation splits: what ``load_glue`` loads by default."""
        return (self.train_split,) + self.validation_splits


_PAIR = ("sentence1", "sentence2")
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable")),
        GlueTask("sst2", ("sentence",), ("negative", "positive")),
        GlueTask("mrpc", _PAIR, ("not_equivalent", "equivalent")),
        GlueTask("stsb", _PAIR, ()),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            validation_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        GlueTask("rte", _PAIR, ("entailment", "not_entailment")),
        GlueTask("wnli", _PAIR, ("not_entailment", "entailment")),
    )
}

_TASK_ALIASES = {"sst": "sst2", "sts": "stsb"}


def glue_task(task: str | GlueTask) -> GlueTask:
    """Look up a task (case-insensitive; ``SST-2``, ``STS-B`` spellings accepted)."""
    if isinstance(task, GlueTask):
        return task
    if isinstance(task, str):
        name = task.strip().lower().replace("-", "").replace("_", "")
        name = _TASK_ALIASES.get(name, name)
        if name in GLUE_TASKS:
            return GLUE_TASKS[name]
    raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")


@dataclass(frozen=True)
class OriginalLayout:
    """How an original GLUE TSV of a task names its columns (where they differ from Hugging Face's).

    ``columns`` maps each Hugging Face column (the text fields and ``label``) to the file's column;
    ``header`` is the original file's whole header, for messages; ``has_header`` is False for CoLA,
    whose train and dev files start with the first example (positions then name the columns).
    """

    columns: Mapping[str, str]
    header: tuple[str, ...]
    has_header: bool = True


_COLA_POSITIONS = ("source", "label", "original label", "sentence")
_STSB_HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score")
_MNLI_HEADER = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "[label2..label5 in dev]", "gold_label")
ORIGINAL_LAYOUTS: dict[str, OriginalLayout] = {
    # the same mapping as the Hugging Face glue loader's text_features / label_column per task
    "cola": OriginalLayout({"sentence": "sentence", "label": "label"}, _COLA_POSITIONS, has_header=False),
    "mrpc": OriginalLayout({"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
                           ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")),
    "qqp": OriginalLayout({"question1": "question1", "question2": "question2", "label": "is_duplicate"},
                          ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")),
    "stsb": OriginalLayout({"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}, _STSB_HEADER),
    "mnli": OriginalLayout({"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}, _MNLI_HEADER),
}
"""The original GLUE TSV layouts that differ from the Hugging Face columns. SST-2 (sentence, label),
QNLI (index, question, sentence, label), RTE and WNLI (index, sentence1, sentence2, label) already
use the Hugging Face names; their extra ``index`` column is dropped."""


def _is_headerless_cola(first: Sequence[str]) -> bool:
    """CoLA's train/dev rows: source, 0/1, original label ('' or '*'), sentence — no header line."""
    return len(first) == len(_COLA_POSITIONS) and first[1].strip() in ("0", "1")


def _expected_layouts(spec: GlueTask) -> str:
    """The accepted column sets, for error messages."""
    text = f"{', '.join(spec.columns)} (the Hugging Face columns)"
    orig = ORIGINAL_LAYOUTS.get(spec.name)
    if orig is not None:
        needed = ", ".join(orig.columns[c] for c in spec.columns)
        if orig.has_header:
            text += f" or {needed} (the original GLUE TSV: {', '.join(orig.header)})"
        else:
            text += f" or, without a header line, the original GLUE TSV's {len(orig.header)} columns {', '.join(orig.header)}"
    return text


# --------------------------------------------------------------------------------------------
# loading


def load_glue(
    task: str,
    data_dir: str | Path | None = None,
    *,
    splits: Sequence[str] | None = None,
    cache_dir: str | None = None,
):
    """A ``datasets.DatasetDict`` of ``task`` with the requested ``splits`` (default: train and the
    validation split(s), e.g. ``validation_matched`` and ``validation_mismatched`` for MNLI).

    ``data_dir=None`` loads ``nyu-mll/glue`` from the Hugging Face Hub (needs a network or a
    filled ``datasets`` cache). A path loads local data (see the module docstring); missing
    directories, files, splits or columns raise errors that say what was expected.
    """
    spec = glue_task(task)
    if isinstance(splits, str):
        raise ValueError(f"splits must be a sequence of split names, got the string {splits!r}")
    wanted = tuple(spec.splits if splits is None else splits)
    if not wanted:
        raise ValueError("splits is empty: name at least one split")
    known = spec.splits + spec.test_splits
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"GLUE {spec.name} has no split {unknown[0]!r}; its splits are {', '.join(known)}")

    import datasets

    if data_dir is None:  # pragma: no cover - needs the network
        dd = datasets.load_dataset(HUB_DATASET, spec.name, cache_dir=cache_dir)
        return datasets.DatasetDict({s: dd[s] for s in wanted})

    root = Path(data_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"GLUE data directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"GLUE data_dir must be a directory, got the file {root}")
    for d in (root, root / spec.name):
        if (d / "dataset_dict.json").is_file():
            return _load_saved(spec, d, wanted)
        if d.is_dir() and any(_split_files(d, s) for s in known):
            return _load_files(spec, d, wanted)
    if (root / "state.json").is_file():
        raise ValueError(
            f"{root} holds a single Dataset, not a DatasetDict: save the splits together "
            "(DatasetDict({'train': ..., 'validation': ...}).save_to_disk(path))"
        )
    expected = ", ".join(f"{s}.{{{','.join(FILE_EXTENSIONS)}}}" for s in wanted)
    raise FileNotFoundError(
        f"no GLUE {spec.name} data in {root} (nor in {root / spec.name}): expected a DatasetDict saved "
        f"with save_to_disk (dataset_dict.json) or split files {expected} with columns {_expected_layouts(spec)}"
    )


def _split_names(split: str) -> tuple[str, ...]:
    """File stems accepted for a split: the split name, and dev* for validation*."""
    if split.startswith("validation"):
        return (split, "dev" + split[len("validation"):])
    return (split,)


def _split_files(d: Path, split: str) -> list[Path]:
    return [d / f"{n}.{ext}" for n in _split_names(split) for ext in FILE_EXTENSIONS if (d / f"{n}.{ext}").is_file()]


def _load_saved(spec: GlueTask, d: Path, wanted: tuple[str, ...]):
    import datasets

    loaded = datasets.load_from_disk(str(d))
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{d} holds a single Dataset, not a DatasetDict with splits {', '.join(wanted)}")
    out = {}
    for split in wanted:
        if split not in loaded:
            raise ValueError(
                f"the saved GLUE {spec.name} dataset in {d} has no split {split!r} "
                f"(it has {', '.join(loaded) or 'none'}; expected {', '.join(wanted)})"
            )
        ds = loaded[split]
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"split {split!r} of the saved dataset in {d} lacks column(s) {', '.join(missing)} "
                f"(GLUE {spec.name} needs {', '.join(spec.columns)}; it has {', '.join(ds.column_names)})"
            )
        dtype = getattr(ds.features["label"], "dtype", "")
        if spec.is_regression and not str(dtype).startswith("float"):
            raise ValueError(f"GLUE {spec.name} is a regression task: column 'label' of split {split!r} in {d} must hold floats, got {dtype}")
        if not spec.is_regression and not str(dtype).startswith("int"):
            raise ValueError(f"GLUE {spec.name} needs integer class ids in column 'label' of split {split!r} in {d}, got {dtype}")
        out[split] = ds
    return datasets.DatasetDict(out)


@dataclass
class _Records:
    """One split file as read: its column names and rows (dicts), each row's line in the file (CSV,
    TSV), the rows with fewer fields than the header (their missing trailing fields are None), and
    whether the file had no header line (CoLA's original train/dev TSVs)."""

    columns: list[str]
    rows: list[Mapping[str, Any]]
    lines: list[int] | None = None
    short: frozenset[int] = frozenset()
    headerless: bool = False

    def where(self, path: Path, i: int) -> str:
        return f"{path}, line {self.lines[i]}" if self.lines else f"{path}, example {i}"


def _read_records(path: Path, spec: GlueTask) -> _Records:
    """The records of one split file."""
    ext = path.suffix[1:].lower()
    if ext in ("csv", "tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            if ext == "csv":
                reader = csv.reader(f)
            else:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            lines = [(reader.line_num, fields) for fields in reader if fields]  # blank lines skipped, as DictReader does
        if not lines:
            raise ValueError(f"{path} is empty: expected a header line with the column names")
        headerless = spec.name == "cola" and ext == "tsv" and _is_headerless_cola(lines[0][1])
        if headerless:
            columns = list(_COLA_POSITIONS)
        else:
            columns = lines[0][1]
            lines = lines[1:]
        rows, short = [], set()
        for line_num, fields in lines:
            if len(fields) > len(columns):
                raise ValueError(
                    f"{path}, line {line_num}: expected {len(columns)} fields ({', '.join(columns)}), got {len(fields)}"
                    + (" (TSV fields are not quoted: a tab inside a text breaks the row)" if ext == "tsv" else "")
                )
            if len(fields) < len(columns):
                short.add(len(rows))
            rows.append({c: (fields[j] if j < len(fields) else None) for j, c in enumerate(columns)})
        return _Records(columns, rows, [n for n, _ in lines], frozenset(short), headerless)
    text = path.read_text(encoding="utf-8-sig")
    if ext == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                "one object per line belongs in a .jsonl file"
            ) from None
        if isinstance(data, list):
            rows = data
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: entry {i} of the array is {type(row).__name__}, expected an object")
        elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            lengths = {k: len(v) for k, v in data.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{path}: the column arrays differ in length: {lengths}")
            n = next(iter(lengths.values()), 0)
            rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
        else:
            raise ValueError(f"{path}: expected an array of objects or an object of column arrays")
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    return _Records(columns, rows)


def _parse_label(spec: GlueTask, value: Any, where: str, allow_unlabelled: bool) -> int | float:
    if spec.is_regression:
        try:
            y = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {value!r} is not a number (STS-B labels are similarity scores)") from None
        if not math.isfinite(y):
            raise ValueError(f"{where}: label {value!r} is not finite")
        return y
    y: int | None = None
    if isinstance(value, bool):
        y = int(value)
    elif isinstance(value, int):
        y = value
    elif isinstance(value, float) and value.is_integer():
        y = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if s in spec.label_names:
            y = spec.label_names.index(s)
        else:
            try:
                y = int(s)
            except ValueError:
                try:
                    f = float(s)
                    y = int(f) if f.is_integer() else None
                except ValueError:
                    y = None
    if y is None:
        raise ValueError(
            f"{where}: label {value!r} is neither a class id 0..{spec.num_labels - 1} "
            f"nor a class name ({', '.join(spec.label_names)})"
        )
    if not (0 <= y < spec.num_labels or (allow_unlabelled and y == -1)):
        raise ValueError(f"{where}: label {y} is out of range: GLUE {spec.name} has classes 0..{spec.num_labels - 1}")
    return y


def _load_files(spec: GlueTask, d: Path, wanted: tuple[str, ...]):
    import datasets

    if spec.is_regression:
        label_feature = datasets.Value("float32")
    else:
        label_feature = datasets.ClassLabel(names=list(spec.label_names))
    features = datasets.Features(
        {**{f: datasets.Value("string") for f in spec.text_fields}, "label": label_feature, "idx": datasets.Value("int32")}
    )
    out = {}
    for split in wanted:
        files = _split_files(d, split)
        if not files:
            names = " or ".join(f"{n}.{{{','.join(FILE_EXTENSIONS)}}}" for n in _split_names(split))
            raise FileNotFoundError(f"GLUE {spec.name}: no file for split {split!r} in {d}: expected {names}")
        if len(files) > 1:
            raise ValueError(f"GLUE {spec.name}: several files for split {split!r} in {d}: {', '.join(f.name for f in files)}; keep one")
        path = files[0]
        out[split] = datasets.Dataset.from_dict(_split_data(spec, path, split), features=features, split=split)
    return datasets.DatasetDict(out)


def _choose_layout(spec: GlueTask, rec: _Records, is_test: bool) -> tuple[dict[str, str], bool] | None:
    """(Hugging Face column -> file column, whether it is an original GLUE layout) for the file's
    columns, or None when it matches no layout. The Hugging Face names win when both match."""
    needed = spec.text_fields if is_test else spec.columns
    orig = ORIGINAL_LAYOUTS.get(spec.name)
    if rec.headerless and orig is not None:
        return dict(orig.columns), True
    if all(c in rec.columns for c in needed):
        return {c: c for c in spec.columns}, False
    if orig is not None and orig.has_header and all(orig.columns[c] in rec.columns for c in needed):
        return dict(orig.columns), True
    return None


def _split_data(spec: GlueTask, path: Path, split: str) -> dict[str, list[Any]]:
    """The columns (text fields, label, idx) of one split file, in either layout."""
    rec = _read_records(path, spec)
    is_test = split.startswith("test")
    layout = _choose_layout(spec, rec, is_test)
    if layout is None:
        required = spec.text_fields if is_test else spec.columns
        missing = [c for c in required if c not in rec.columns]
        raise ValueError(
            f"{path} lacks column(s) {', '.join(missing)}: GLUE {spec.name} needs {_expected_layouts(spec)} "
            f"(the file has {', '.join(map(str, rec.columns)) or 'no columns'})"
        )
    mapping, original = layout
    label_col = mapping["label"]
    has_label = label_col in rec.columns
    if not rec.rows:
        raise ValueError(f"{path} has a header but no examples")
    needed = [mapping[f] for f in spec.text_fields] + ([label_col] if has_label else [])
    data: dict[str, list[Any]] = {f: [] for f in spec.text_fields}
    data["label"] = []
    data["idx"] = []
    skipped: list[int] = []
    for i, row in enumerate(rec.rows):
        where = f"{path}, example {i}"
        if i in rec.short:
            if not original:
                raise ValueError(
                    f"{rec.where(path, i)}: expected {len(rec.columns)} fields ({', '.join(rec.columns)}), "
                    f"got {sum(v is not None for v in row.values())}"
                )
            if any(row[c] is None for c in needed):
                skipped.append(rec.lines[i])  # the Hugging Face loader drops these rows too
                continue
        if original and has_label and not spec.is_regression and not str(row[label_col]).strip():
            skipped.append(rec.lines[i] if rec.lines else i)  # an empty class label: dropped by that loader as well
            continue
        for f in spec.text_fields:
            v = row.get(mapping[f])
            if v is None:
                raise ValueError(f"{where}: column {mapping[f]!r} is missing or null")
            data[f].append(v if isinstance(v, str) else str(v))
        if label_col in row:
            data["label"].append(_parse_label(spec, row[label_col], where, allow_unlabelled=is_test))
        else:
            data["label"].append(-1)
        idx = i if original else row.get("idx", i)  # the original files: the row number, as Hugging Face's idx
        try:
            data["idx"].append(int(idx))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: idx {idx!r} is not an integer") from None
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"{path}: skipped {len(skipped)} row(s) with a missing field or an empty label (line(s) {shown}), "
            "as the Hugging Face GLUE loader does",
            stacklevel=4,
        )
    if not data["idx"]:
        raise ValueError(f"{path} has no complete examples")
    return data


# --------------------------------------------------------------------------------------------
# tokenization and batching


def tokenize_glue(dataset_dict, tokenizer: Any, task: str, max_length: int = 128, *, num_proc: int | None = None, keep_in_memory: bool = False):
    """Tokenize every split (a ``DatasetDict`` or a single ``Dataset``) for ``model(**batch)``.

    Returns the same kind of object with only ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (when the tokenizer makes them) and ``labels`` (int64 class ids; float32
    for STS-B). Sequences are truncated to ``max_length`` (pairs: longest first) but NOT padded:
    ``GlueCollator`` pads each batch to its longest sequence.
    """
    import datasets

    spec = glue_task(task)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4, got {max_length!r}")
    single = isinstance(dataset_dict, datasets.Dataset)
    if not single and not isinstance(dataset_dict, datasets.DatasetDict):
        raise ValueError(f"expected a datasets.DatasetDict or Dataset, got {type(dataset_dict).__name__}")
    parts = {"data": dataset_dict} if single else dict(dataset_dict)
    label_type = datasets.Value("float32") if spec.is_regression else datasets.Value("int64")
    fields = spec.text_fields

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tokenizer(*[batch[f] for f in fields], truncation=True, max_length=max_length)
        out = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        out["labels"] = batch["label"]
        return out

    result = {}
    for split, ds in parts.items():
        missing = [c for c in spec.columns if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"split {split!r} lacks column(s) {', '.join(missing)} needed to tokenize GLUE {spec.name} "
                f"(it has {', '.join(ds.column_names)})"
            )
        tokenized = ds.map(
            encode,
            batched=True,
            remove_columns=ds.column_names,
            num_proc=num_proc,
            keep_in_memory=keep_in_memory,
            desc=f"tokenizing GLUE {spec.name} {split}",
        )
        if tokenized.features["labels"] != label_type:
            tokenized = tokenized.cast_column("labels", label_type)
        result[split] = tokenized
    return result["data"] if single else datasets.DatasetDict(result)


class GlueCollator:
    """Collate tokenized examples into a batch of tensors padded right to the longest sequence.

    Examples are mappings (rows of ``tokenize_glue``'s output) with ``input_ids`` and optionally
    ``attention_mask``, ``token_type_ids`` and ``labels`` (or ``label``); other keys are ignored.
    Returns ``{"input_ids", "attention_mask", ["token_type_ids"], ["labels"]}``, int64 except float32
    labels when ``regression`` (default: inferred, float labels mean regression).
    """

    def __init__(self, pad_token_id: int = 0, *, pad_to_multiple_of: int | None = None, regression: bool | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no padding token")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.regression = regression

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        ids = [_as_list(f["input_ids"]) if "input_ids" in f else None for f in features]
        if any(x is None for x in ids):
            raise KeyError("every example needs 'input_ids' (tokenize first: tokenize_glue)")
        lengths = [len(x) for x in ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(features)
        batch = {"input_ids": torch.full((n, width), self.pad_token_id, dtype=torch.long)}
        batch["attention_mask"] = torch.zeros((n, width), dtype=torch.long)
        has_types = "token_type_ids" in features[0]
        if has_types:
            batch["token_type_ids"] = torch.zeros((n, width), dtype=torch.long)
        for i, (f, x) in enumerate(zip(features, ids)):
            L = len(x)
            batch["input_ids"][i, :L] = torch.as_tensor(x, dtype=torch.long)
            if "attention_mask" in f:
                mask = _as_list(f["attention_mask"])
                if len(mask) != L:
                    raise ValueError(f"example {i}: attention_mask has {len(mask)} entries, input_ids {L}")
                batch["attention_mask"][i, :L] = torch.as_tensor(mask, dtype=torch.long)
            else:
                batch["attention_mask"][i, :L] = 1
            if has_types:
                types = _as_list(f["token_type_ids"])
                if len(types) != L:
                    raise ValueError(f"example {i}: token_type_ids has {len(types)} entries, input_ids {L}")
                batch["token_type_ids"][i, :L] = torch.as_tensor(types, dtype=torch.long)
        key = "labels" if "labels" in features[0] else ("label" if "label" in features[0] else None)
        if key is not None:
            labels = [f[key] for f in features]
            regression = self.regression
            if regression is None:
                regression = any(
                    isinstance(y, float) or (isinstance(y, torch.Tensor) and y.is_floating_point()) for y in labels
                )
            values = [y.item() if isinstance(y, torch.Tensor) else y for y in labels]
            batch["labels"] = torch.tensor(values, dtype=torch.float32 if regression else torch.long)
        return batch


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)


def collate_glue(features: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """``GlueCollator(pad_token_id)(features)``: for ``DataLoader(..., collate_fn=collate_glue)``
    with tokenizers whose padding id is 0 (BERT's)."""
    return GlueCollator(pad_token_id)(features)


def glue_collator(tokenizer: Any, task: str, *, pad_to_multiple_of: int | None = None) -> GlueCollator:
    """The collator for ``task`` with ``tokenizer``'s padding id."""
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("GlueCollator pads on the right; the tokenizer pads on the left")
    return GlueCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of, regression=glue_task(task).is_regression)
