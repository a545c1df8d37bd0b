"""Text sources -> GPT-2 tokens -> MDLM-wrapped blocks, cached on disk as one ``.npy`` per source.

A *source* is a local file (or glob) of JSON lines / plain text / parquet, or a hub dataset
``hf:NAME[@REVISION][#PART]``. Local JSON lines and text need only the standard library; parquet needs
``pyarrow`` and hub sources need ``datasets``, both imported lazily.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from mdlm_sched.artifacts import data_cache_file
from mdlm_sched.errors import DataError
from mdlm_sched.fileio import atomic_file
from mdlm_sched.hub import HUB_PREFIX

if TYPE_CHECKING:  # transformers takes seconds to import; only load_tokenizer needs it at run time
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# What to do when a source is shorter than one block, for the training config (commands name their own option).
SHORT_DATA_FIX = "use a smaller data.seq_len or more documents"
# MDLM holds out the last 100k documents of the OpenWebText hub train split as validation.
OWT_VAL_DOCS = 100_000

EOT = "<|endoftext|>"  # document separator line in .txt sources
_TEXT_FORMATS = (".jsonl", ".json", ".txt")  # each optionally compressed with .xz or .gz
_SUPPORTED = ".jsonl, .jsonl.xz, .jsonl.gz, .json, .txt (each optionally .xz/.gz) or .parquet"
_TOKENIZE_BATCH = 1000  # documents per tokenizer call: fast batched Rust path, bounded memory
_CACHE_VERSION = 1  # bump when the block layout changes so that old caches are not reused


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str,
                   fix: str = "set data.tokenizer=<folder with tokenizer.json> or a reachable hub name"
                   ) -> PreTrainedTokenizerBase:
    """Load a tokenizer with AutoTokenizer from a local folder or a hub name; fix: the remedy the error names."""
    looks_like_path = os.sep in name_or_path or name_or_path.startswith((".", "/"))
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise DataError(f"tokenizer folder {name_or_path} does not exist; {fix}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()) if looks_like_path else name_or_path)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "this is not a loadable tokenizer"
        raise DataError(f"cannot load tokenizer {name_or_path!r} ({_one_line(exc)}); {fix}") from exc


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex digest of the tokenizer's vocabulary (token -> id, added tokens included)."""
    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of [MASK]: appended after the vocabulary (50257 for GPT-2, so the MDLM vocab is 50258)."""
    return len(tokenizer)


# ----------------------------------------------------------------------------- sources


def check_source(source: str, root: str | Path | None = None) -> None:
    """Raise DataError if a local source (or glob) matches no file or has an unsupported extension."""
    if not source.startswith(HUB_PREFIX):
        _local_files(source, root)


def iter_documents(
    source: str,
    root: str | Path | None = None,
    text_field: str = "text",
    max_docs: int | None = None,
) -> Iterator[str]:
    """Yield the non-empty documents of a local file/glob or an ``hf:NAME[@REVISION][#PART]`` dataset."""
    if source.startswith(HUB_PREFIX):
        docs = _hub_documents(source, text_field)
    else:
        files = _local_files(source, root)
        docs = (doc for path in files for doc in _file_documents(path, text_field))
    # islice stops before reading past the cap (max_docs=None reads everything).
    yield from islice((doc for doc in docs if doc.strip()), max_docs)


def _local_files(source: str, root: str | Path | None) -> list[Path]:
    """The files a local source names, sorted; raises DataError for no match or a bad extension."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(root if root is not None else Path.cwd()) / path
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise DataError(f"data source {source} matches no file (looked for {path}); fix the pattern or the path")
    elif path.is_dir():
        raise DataError(f"data source {path} is a folder; give a file or a glob such as {path}/*.jsonl.xz")
    elif not path.is_file():
        raise DataError(f"data source {source} does not exist (looked for {path}); fix the path")
    else:
        files = [path]
    for file in files:
        _format_of(file)
    return [file.resolve() for file in files]


def _format_of(path: Path) -> tuple[str, str]:
    """(format, compression) of a file name, e.g. ('.jsonl', '.xz'); DataError if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in (".xz", ".gz") else ""
    fmt = suffixes[-1] if suffixes else ""
    if fmt in _TEXT_FORMATS or (fmt == ".parquet" and not compression):
        return fmt, compression
    raise DataError(f"data source {path} has an unsupported extension; use {_SUPPORTED}")


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    fmt, compression = _format_of(path)
    if fmt == ".parquet":
        yield from _parquet_documents(path, text_field)
        return
    lines = text_lines(path, compression)
    yield from (_txt_documents(lines) if fmt == ".txt" else _jsonl_documents(lines, path, text_field))


# What a damaged file raises while it is read: lzma and gzip's own errors, and EOFError for a stream cut short.
_DAMAGED = (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError)


def text_lines(path: Path, compression: str = "") -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, decompressed; a damaged or non-UTF-8 file raises DataError.

    Lines are split at "\n" only and keep their line ending, so a "\r" inside a .txt document stays as written.
    """
    opener: Any = {".xz": lzma.open, ".gz": gzip.open, "": open}[compression]
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                    f"{exc.start + 1}); convert the file to UTF-8") from None
                yield lineno, line
    except _DAMAGED as exc:
        kind = {".xz": "an xz", ".gz": "a gzip"}.get(compression, "a")
        raise DataError(f"{path} is not {kind} file or is cut short (after line {lineno}: {_one_line(exc)}); "
                        f"download or copy it again") from None


def _jsonl_documents(lines: Iterable[tuple[int, str]], path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); give one JSON object per line") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(
                f"{path}:{lineno} has no {text_field!r} field; set data.text_field to the field holding the text"
            )
        yield _check_text(record[text_field], path, text_field)


def _txt_documents(lines: Iterable[tuple[int, str]]) -> Iterator[str]:
    """Documents separated by lines that consist of ``<|endoftext|>`` alone."""
    doc: list[str] = []
    for _, line in lines:
        if line.rstrip("\r\n") == EOT:
            yield _strip_newline("".join(doc))
            doc = []
        else:
            doc.append(line)
    yield _strip_newline("".join(doc))


def _strip_newline(text: str) -> str:
    # The line break before a separator line (or at the end of the file) belongs to the format.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs pyarrow; install pyarrow: pip install 'mdlm-sched[parquet]'") from exc
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable parquet file ({_one_line(exc)}); copy it again") from None
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no {text_field!r} column; set data.text_field to the column holding the text")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=_TOKENIZE_BATCH):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else _check_text(text, path, text_field)


def _check_text(text: Any, path: Path | str, text_field: str) -> str:
    if not isinstance(text, str):
        raise DataError(
            f"{path}: field {text_field!r} holds {type(text).__name__}, not text; "
            "set data.text_field to the field holding the text"
        )
    return text


def _hub_documents(source: str, text_field: str) -> Iterator[str]:
    """Documents of ``hf:NAME[@REVISION][#PART]``: PART train/val is MDLM's split of the hub train split.

    REVISION picks a branch of the dataset repo, e.g. ``refs/convert/parquet`` for datasets whose
    main branch holds only a loading script (which datasets >= 4 no longer runs).
    """
    spec, _, part = source[len(HUB_PREFIX) :].partition("#")
    name, _, revision = spec.partition("@")
    if not name:
        raise DataError(f"data source {source!r} names no dataset; write hf:NAME or hf:NAME#PART")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"data source {source} needs the datasets package; "
            "pip install 'mdlm-sched[hub]' or use local files"
        ) from exc
    split = "train" if part in ("", "train", "val") else part
    try:
        dataset = datasets.load_dataset(name, split=split, **({"revision": revision} if revision else {}))
    except Exception as exc:  # network, unknown name or split: the user must fix the source
        raise DataError(
            f"cannot load hub dataset {name} split {split} ({_one_line(exc)}); "
            "check the name, split and network access (a script-only dataset needs "
            "hf:NAME@refs/convert/parquet), or use local files"
        ) from exc
    if part in ("train", "val"):
        dataset = _mdlm_split(dataset, part, OWT_VAL_DOCS)
    if text_field not in dataset.column_names:
        raise DataError(f"{source} has no {text_field!r} column; set data.text_field to the column holding the text")
    for batch in dataset.select_columns([text_field]).iter(batch_size=_TOKENIZE_BATCH):
        for text in batch[text_field]:
            yield "" if text is None else _check_text(text, source, text_field)


def _mdlm_split(dataset: Any, part: str, val_docs: int = OWT_VAL_DOCS) -> Any:
    """MDLM's document split of one datasets.Dataset: val = the last val_docs documents, train = the rest."""
    n = len(dataset)
    if n <= val_docs:
        raise DataError(
            f"dataset has {n} documents, not more than the {val_docs} held out for val; "
            "use a larger dataset or a plain split name (hf:NAME#SPLIT)"
        )
    cut = n - val_docs
    return dataset.select(range(cut)) if part == "train" else dataset.select(range(cut, n))


# ----------------------------------------------------------------------------- blocks


def wrap_documents(token_lists: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> np.ndarray:
    """MDLM wrapping: doc+EOS concatenated, cut into seq_len-2 chunks, each [BOS] chunk [EOS].

    The remainder shorter than one chunk is dropped. Returns [n_blocks, seq_len], uint16 when every
    id fits (GPT-2), else int32.
    """
    if seq_len < 3:
        raise DataError(f"seq_len {seq_len} leaves no room for text between BOS and EOS; use data.seq_len >= 3")
    eos = np.array([eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for ids in token_lists:
        parts += [np.asarray(ids, dtype=np.int32), eos]
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)  # [n_tokens]
    chunk = seq_len - 2
    n_blocks = len(stream) // chunk
    max_id = max(bos_id, eos_id, int(stream.max()) if len(stream) else 0)
    blocks = np.empty((n_blocks, seq_len), dtype=np.uint16 if max_id < 2**16 else np.int32)
    blocks[:, 0] = bos_id
    blocks[:, 1:-1] = stream[: n_blocks * chunk].reshape(n_blocks, chunk)  # [n_blocks, seq_len-2]
    blocks[:, -1] = eos_id
    return blocks


def tokenized_blocks(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | Path,
    root: str | Path | None = None,
    text_field: str = "text",
    max_docs: int | None = None,
    short_fix: str = SHORT_DATA_FIX,
) -> np.ndarray:
    """Documents of source -> tokens -> wrapped blocks [n_blocks, seq_len], cached (read-only memmap).

    short_fix: what the caller's user should do when the source is shorter than one block (names their option).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; set data.tokenizer to one with an EOS token (e.g. GPT-2)")
    identity = _source_identity(source, root)
    key = json.dumps([_CACHE_VERSION, identity, tokenizer_hash(tokenizer), eos_id, seq_len, text_field, max_docs])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.rsplit("/", 1)[-1])[:48]
    path = data_cache_file(cache_dir, stem, seq_len, hashlib.sha256(key.encode()).hexdigest()[:24])

    if path.is_file():
        blocks = _load(path)
        log.info("data cache hit for %s: %d blocks of %d tokens from %s", source, len(blocks), seq_len, path)
        return blocks

    counts = {"docs": 0, "tokens": 0}
    docs = iter_documents(source, root, text_field, max_docs)
    blocks = wrap_documents(_token_arrays(docs, tokenizer, counts, source, max_docs), seq_len, eos_id, eos_id)
    if len(blocks) == 0:
        raise DataError(
            f"data source {source} gave no block: its text ({counts['docs']} documents, {counts['tokens']} tokens) "
            f"is shorter than one block of {seq_len} tokens; {short_fix}"
        )
    with atomic_file(path, "wb") as fh:  # a crash never leaves half a cache
        np.save(fh, blocks)
    log.info(
        "data cache miss for %s: %d documents, %d tokens -> %d blocks of %d tokens, cached at %s",
        source, counts["docs"], counts["tokens"], len(blocks), seq_len, path,
    )
    return _load(path)


def _source_identity(source: str, root: str | Path | None) -> list[Any]:
    """What the cache depends on: the hub source string, or path, size and mtime of every local file."""
    if source.startswith(HUB_PREFIX):
        return [source]
    return [[str(p), st.st_size, st.st_mtime_ns] for p in _local_files(source, root) for st in [p.stat()]]


def _token_arrays(
    docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, counts: dict[str, int], desc: str, total: int | None
) -> Iterator[np.ndarray]:
    """Tokenise in batches of documents; one int32 array per document (no special tokens)."""
    docs = iter(docs)
    with tqdm(desc=f"tokenising {desc}", unit="doc", total=total) as bar:
        while batch := list(islice(docs, _TOKENIZE_BATCH)):
            # verbose=False: documents longer than the model's 1024 positions are expected here.
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                counts["tokens"] += len(ids)
                yield np.asarray(ids, dtype=np.int32)
            counts["docs"] += len(batch)
            bar.update(len(batch))


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"data cache {path} is unreadable ({_one_line(exc)}); delete it to rebuild it") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def load_sources(
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | Path,
    text_field: str = "text",
    max_docs: int | None = None,
    short_fix: str = SHORT_DATA_FIX,
) -> np.ndarray:
    """Blocks of several sources [sum of n_blocks, seq_len], each source wrapped (and cached) on its own."""
    parts = [tokenized_blocks(s, tokenizer, seq_len, cache_dir, text_field=text_field, max_docs=max_docs,
                              short_fix=short_fix) for s in sources]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
