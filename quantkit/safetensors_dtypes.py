"""Torch dtypes and the names the safetensors format gives them: one table for the readers
(the bulk layer read) and the writers (the checkpoint, the work folder)."""

from __future__ import annotations

import torch

# safetensors dtype names -> torch (F8_E8M0: MXFP4 scales where a checkpoint stores them so).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
