"""CheckpointWriter: sharded safetensors in a staging folder, published atomically.

Every format shares this: tensors are buffered until ``max_shard_size``, each full shard is a
complete file in the staging folder (inside the run's hidden work folder beside
``output_dir``), and only when the index, config and tokenizer are written is the folder
renamed into place. A failure leaves any previous output untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import ExportError
from .formats.base import Format
from .scheme import QuantizedWeight

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def work_dir_for(output_dir: Path) -> Path:
    """The hidden folder beside the output (same filesystem, so the final rename is atomic)."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.quantkit-partial"


class CheckpointWriter:
    def __init__(self, output_dir: Path, staging_dir: Path, fmt: Format, dtype: torch.dtype,
                 max_shard_size: int, overwrite: bool):
        self.output_dir = Path(output_dir)
        self.fmt, self.dtype, self.max_shard_size, self.overwrite = fmt, dtype, max_shard_size, overwrite
        self.work_dir = Path(staging_dir)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def check_target(self) -> None:
        """Refuse an existing output before any weight is read, unless overwrite is set."""
        if self.output_dir.exists() and not self.overwrite:
            raise ExportError(f"export.output_dir {self.output_dir} exists; choose another folder "
                              "or set export.overwrite: true")

    def start(self) -> None:
        self.check_target()
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)

    def add(self, name: str, tensor: torch.Tensor, keep_dtype: bool = False) -> None:
        """Buffer one tensor; float tensors are cast to the export dtype unless ``keep_dtype``."""
        t = tensor.detach().to("cpu")
        if t.is_floating_point() and not keep_dtype:
            t = t.to(self.dtype)
            if not torch.isfinite(t).all():
                raise ExportError(f"{name} overflows {str(self.dtype).replace('torch.', '')} on export; "
                                  "set model.dtype: bfloat16 or float32")
        self._put(name, t)

    def _put(self, name: str, t: torch.Tensor) -> None:
        if name in self._buffer:
            raise ExportError(f"internal: tensor {name} written twice")
        # A view into a larger storage would make safetensors write (or refuse) the whole storage.
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        size = t.numel() * t.element_size()
        # Close the shard before a tensor that would push it past the limit: max_shard_size is
        # the largest shard (only a single tensor bigger than the limit gets a shard above it).
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self.flush()
        self._buffer[name] = t
        self._buffer_bytes += size
        if self._buffer_bytes >= self.max_shard_size:
            self.flush()

    def add_quantized(self, prefix: str, qw: QuantizedWeight) -> None:
        for name, t in self.fmt.weight_tensors(prefix, qw, self.dtype).items():
            self._put(name, t.detach().to("cpu"))

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(self.work_dir / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._buffer)))
        self.total_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def finalize(self, config: dict[str, Any], files: dict[str, str | bytes], copy_files: list[Path]) -> Path:
        """Name shards, write index/config/extra files, then publish the folder atomically."""
        self.flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.work_dir / part, self.work_dir / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.work_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.work_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for src in copy_files:
            shutil.copy2(src, self.work_dir / src.name)
        for name, content in files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.work_dir / name, mode) as f:
                f.write(content)
        self._publish()
        return self.output_dir

    def _publish(self) -> None:
        old = self.output_dir.parent / f".{self.output_dir.name}.quantkit-old"
        if self.output_dir.exists():
            if not self.overwrite:
                raise ExportError(f"export.output_dir {self.output_dir} appeared during the run; "
                                  f"the result is kept in {self.work_dir}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.output_dir, old)
        os.replace(self.work_dir, self.output_dir)
        if old.exists():
            shutil.rmtree(old)

