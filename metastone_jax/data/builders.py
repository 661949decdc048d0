"""tensorflow-datasets builders: math prompt files and synthetic tasks -> array_record.

Every source becomes records of one schema (all ``str``):

    {"id": ..., "prompt": user question text,
     "messages": JSON list of chat messages [{"role", "content"}] the chat template renders,
     "answer": ground truth, "solution": reference solution / SFT response ("" when absent)}

Datasets are read back with ``builder.as_data_source`` (random access, no TensorFlow):

    src = prepare_math_file("aime24.jsonl", data_dir)     # Source, split "train"
    src[0]["answer"], len(src)
    splits = prepare_synthetic(make_examples, name="arith", splits={"train": 1000}, seed=0,
                               data_dir=data_dir)          # {"train": Source}

Builds are idempotent: the tfds config name encodes a content hash (of the file, or of a
synthetic task's key, see :func:`prepare_synthetic`), so an unchanged input is reused and a
changed one is rebuilt under a new name. tfds builds into an ``incomplete.*`` directory and
renames it on success, so a failed build raises and leaves nothing that a retry would reuse.
Builds are deterministic, so processes racing to build the same dataset on one POSIX file
system are harmless (the first rename wins, the others reuse it); on an object store (GCS),
prepare on one process first or give each host a local ``data_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from metastone_jax import optional

log = logging.getLogger(__name__)

FIELDS = ("id", "prompt", "messages", "answer", "solution")
FORMATS = (".jsonl (prompt/answer, MATH problem/solution/answer, or verl rows)", ".parquet (verl)")
# Bump when the schema or the parsing below changes: old builds are then not reused.
_VERSION = "1.0.0"


class Source:
    """Random-access records of one split: ``len(src)``, ``src[i] -> {field: str}``."""

    def __init__(self, data_source, name: str, data_dir: str):
        self._ds = data_source
        self.name = name
        self.data_dir = data_dir  # where the array_record files live

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, str]:
        n = len(self._ds)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} records")
        return _decode(self._ds[i % n])

    def __getitems__(self, indices: Iterable[int]) -> list[dict[str, str]]:
        """Several records in one read (array_record batches the lookups)."""
        return [_decode(r) for r in self._ds.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"Source({self.name!r}, {len(self)} records, {self.data_dir!r})"


def _decode(rec: Mapping[str, Any]) -> dict[str, str]:
    # tfds Text features come back as bytes from a data source.
    return {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in rec.items()}


# ---------------------------------------------------------------------------------------------
# Record parsing: one function per row format; each raises _RowError(what was expected).
# ---------------------------------------------------------------------------------------------


class _RowError(ValueError):
    pass


def _text(row: Mapping, key: str, *, allow_int: bool = False) -> str:
    if key not in row:
        raise _RowError(f"missing key {key!r} (has {sorted(row)})")
    v = row[key]
    if isinstance(v, str):
        return v
    if allow_int and isinstance(v, int) and not isinstance(v, bool):
        return str(v)  # AIME answers are ints
    want = "a string or an int" if allow_int else "a string"
    raise _RowError(f"{key!r} must be {want}, got {type(v).__name__} {v!r:.80}")


def _user_messages(prompt: str) -> str:
    return json.dumps([{"role": "user", "content": prompt}], ensure_ascii=False)


def _plain_row(row: Mapping, default_id: str) -> dict[str, str]:
    prompt = _text(row, "prompt")
    return {
        "id": _text(row, "id", allow_int=True) if "id" in row else default_id,
        "prompt": prompt,
        "messages": _user_messages(prompt),
        "answer": _text(row, "answer", allow_int=True),
        "solution": _text(row, "solution") if "solution" in row else "",
    }


def _math_row(row: Mapping, default_id: str) -> dict[str, str]:
    prompt = _text(row, "problem")
    return {
        "id": _text(row, "unique_id") if "unique_id" in row else default_id,
        "prompt": prompt,
        "messages": _user_messages(prompt),
        "answer": _text(row, "answer", allow_int=True),
        "solution": _text(row, "solution") if "solution" in row else "",
    }


def _verl_row(row: Mapping, default_id: str) -> dict[str, str]:
    msgs = row.get("prompt")
    if not (isinstance(msgs, list) and msgs):
        raise _RowError(f"'prompt' must be a non-empty list of chat messages, got {msgs!r:.80}")
    for m in msgs:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)):
            raise _RowError(f"chat message must be {{'role': str, 'content': str}}, got {m!r:.80}")
        _text(m, "content")
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users:
        raise _RowError("'prompt' has no message with role 'user'")
    reward = row.get("reward_model")
    if not isinstance(reward, Mapping):
        raise _RowError(f"'reward_model' must be a struct with 'ground_truth', got {reward!r:.80}")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
    # SFT parquet files carry the response in a column (verl's response_key) or extra_info.
    solution = next(
        (v for v in (row.get("response"), row.get("solution"), extra.get("solution")) if v), ""
    )
    if not isinstance(solution, str):
        raise _RowError(f"'response'/'solution' must be a string, got {solution!r:.80}")
    return {
        "id": default_id,
        "prompt": users[-1],
        "messages": json.dumps(
            [{"role": m["role"], "content": m["content"]} for m in msgs], ensure_ascii=False
        ),
        "answer": _text(reward, "ground_truth", allow_int=True),
        "solution": solution,
    }


def _row_parser(row: Mapping) -> Callable[[Mapping, str], dict[str, str]]:
    """The format of a file, decided by its first row's keys."""
    if "reward_model" in row:
        return _verl_row
    if "problem" in row:
        return _math_row
    if "prompt" in row:
        return _plain_row
    raise _RowError(
        f"unknown row format with keys {sorted(row)}: expected {{'prompt', 'answer'}}, "
        "MATH-style {'problem', 'solution', 'answer'}, or verl {'prompt', 'reward_model'}"
    )


def _jsonl_records(path: str) -> Iterator[dict[str, str]]:
    stem = _stem(path)
    parse = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                rec, parse = _jsonl_line(raw, parse, f"{stem}:{lineno}")
            except _RowError as e:
                raise ValueError(f"{path}, line {lineno}: {e}") from None
            if rec is not None:
                yield rec


def _jsonl_line(raw: bytes, parse, default_id: str):
    """(record or None for a blank line, the file's row parser)."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise _RowError(f"not UTF-8 ({e})") from None
    if not line:
        return None, parse  # blank lines (a trailing newline) carry no record
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RowError(f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    parse = parse or _row_parser(row)
    return parse(row, default_id), parse


def _parquet_records(path: str) -> Iterator[dict[str, str]]:
    pq = optional.pyarrow_parquet()
    stem, i = _stem(path), 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            try:
                rec = _verl_row(row, f"{stem}:{i}")
            except _RowError as e:
                raise ValueError(f"{path}, row {i} (0-based): {e}") from None
            yield rec
            i += 1


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ``_make(split)`` records per split; subclassed per dataset by :func:`_build`."""

    VERSION = tfds.core.Version(_VERSION)
    _splits: tuple[str, ...] = ()
    _make: Callable[[str], Iterable[dict[str, str]]]

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: dataset_info_from_configs() lists this module's directory for
        # metadata files and fails for builders defined outside a tfds dataset package.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS}),
            disable_shuffling=True,  # keep generation order: record i is the i-th row
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str):
        yield from enumerate(self._make(split))  # key = row index

    # tfds prints these to stdout; route them to logging instead.
    def _log_download_bytes(self) -> None:
        log.info("building %s into %s", self.info.full_name, self.data_dir)

    def _log_download_done(self) -> None:
        log.info("built %s", self.info.full_name)


def _build(
    name: str, config: str, splits: Iterable[str], make: Callable, data_dir: str
) -> tfds.core.DatasetBuilder:
    """Prepare (or reuse) ``data_dir/name/config/VERSION`` and return the builder."""
    cls = type(
        f"_{name}",
        (_RecordBuilder,),
        {
            "name": name,
            "BUILDER_CONFIGS": [tfds.core.BuilderConfig(name=config)],
            "_splits": tuple(splits),
            "_make": staticmethod(make),
        },
        skip_registration=True,
    )
    tfds.disable_progress_bar()
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare()  # returns at once when the dataset already exists
    except FileExistsError:
        # Another process finished the same (deterministic) build first and its rename won.
        builder = cls(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    return builder


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", s.lower()).strip("_")[:40] or "data"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def prepare_math_file(path: str, data_dir: str) -> Source:
    """Build (or reuse) a dataset of one math file; returns its only split, ``"train"``.

    ``.jsonl``: each line is ``{"prompt", "answer"}`` (optional ``id``, ``solution``), MATH-style
    ``{"problem", "solution", "answer"}`` (id = ``unique_id`` if present) or a verl row; the
    first line decides. ``.parquet``: verl rows (``prompt`` = chat messages, prompt text = the
    last user message; ``reward_model.ground_truth``; SFT response from ``response``/
    ``solution``/``extra_info.solution``). Default ids: ``stem:line`` (1-based) for jsonl,
    ``stem:row`` (0-based) for parquet.
    """
    path = os.path.abspath(os.fspath(path))
    reader = _reader(path)
    config = f"{_slug(_stem(path))}-{_file_digest(path)}"
    builder = _build("metastone_math_file", config, ["train"], lambda _: reader(path), data_dir)
    return Source(builder.as_data_source(split="train"), _stem(path), str(builder.data_dir))


def read_records(path: str) -> list[dict[str, str]]:
    """The records of a benchmark file, read directly (no dataset is built): the fields of
    ``FIELDS`` (``id``, ``prompt``, ``messages``, ``answer``, ``solution``), parsed exactly as
    :func:`prepare_math_file` parses them. Bad rows raise ValueError naming the file and line."""
    path = os.fspath(path)
    return list(_reader(path)(path))


def _reader(path: str) -> Callable[[str], Iterator[dict[str, str]]]:
    """The record reader for the file's format; ValueError for an unknown format or no file."""
    ext = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _jsonl_records, ".parquet": _parquet_records}
    if ext not in readers:
        raise ValueError(f"{path}: unknown format {ext or '(no extension)'!r}; accepted: {FORMATS}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return readers[ext]


def _synthetic_record(rec: Any, name: str, split: str, i: int) -> dict[str, str]:
    """Validate a generated record; ``id``, ``messages`` and ``solution`` have defaults."""
    where = f"synthetic {name!r} split {split!r} example {i}"
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(rec).__name__}")
    unknown = set(rec) - set(FIELDS)
    if unknown:
        raise ValueError(f"{where}: unexpected keys {sorted(unknown)}; fields are {FIELDS}")
    rec = dict(rec)
    if isinstance(rec.get("messages"), list):
        rec["messages"] = json.dumps(rec["messages"], ensure_ascii=False)
    try:
        prompt = _text(rec, "prompt")
        return {
            "id": _text(rec, "id", allow_int=True) if "id" in rec else f"{name}/{split}/{i}",
            "prompt": prompt,
            "messages": _text(rec, "messages") if "messages" in rec else _user_messages(prompt),
            "answer": _text(rec, "answer", allow_int=True),
            "solution": _text(rec, "solution") if "solution" in rec else "",
        }
    except _RowError as e:
        raise ValueError(f"{where}: {e}") from None


def prepare_synthetic(
    make_examples: Callable[[str, int, int], Iterable[Mapping[str, Any]]],
    *,
    name: str,
    splits: Mapping[str, int],
    seed: int,
    data_dir: str,
) -> dict[str, Source]:
    """Build (or reuse) a generated dataset: split ``s`` holds ``make_examples(s, n, seed)``.

    ``make_examples`` must yield exactly ``n`` record dicts (``prompt`` and ``answer``
    required; ``messages`` may be a list; missing ``id``/``messages``/``solution`` get
    defaults). The dataset is keyed by ``name``, ``splits``, ``seed`` and the first record of
    each split (generated lazily: one example per split), since a generator's code cannot be
    hashed reliably, and by the keywords of a ``functools.partial`` (the task's knobs); change
    ``name`` when another task change could leave the first records equal.
    """
    if not splits or any(not isinstance(n, int) or n <= 0 for n in splits.values()):
        raise ValueError(f"splits must map split names to positive sizes, got {dict(splits)}")
    # The first record of each split stands in for the generator's code and knobs, which cannot
    # be hashed reliably; it catches most task changes at the cost of one example per split.
    probe = {s: next(iter(make_examples(s, n, seed)), None) for s, n in sorted(splits.items())}
    # A functools.partial's keyword knobs are known exactly: key on them too.
    knobs = getattr(make_examples, "keywords", None)
    key = json.dumps(
        {"name": name, "splits": dict(sorted(splits.items())), "seed": seed, "probe": probe}
        | ({"knobs": knobs} if knobs else {}),
        sort_keys=True,
        default=repr,
    )
    config = f"{_slug(name)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def make(split: str) -> Iterator[dict[str, str]]:
        n = splits[split]
        count = 0
        for i, rec in enumerate(make_examples(split, n, seed)):
            count += 1
            yield _synthetic_record(rec, name, split, i)
        if count != n:
            raise ValueError(f"synthetic {name!r} split {split!r}: generated {count}, asked {n}")

    builder = _build("metastone_synthetic", config, list(splits), make, data_dir)
    return {
        s: Source(builder.as_data_source(split=s), f"{name}/{s}", str(builder.data_dir))
        for s in splits
    }
