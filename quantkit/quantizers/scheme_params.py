"""Recipe fields of the methods that round onto any scheme (rtn, gptq): a preset by name,
per-pattern overrides, and how they become a ``SchemeAssignment``.

    quantization:
      method: gptq
      scheme: NVFP4              # a preset (quantkit.presets); else bits/group_size/symmetric
      overrides:                 # later entries win where patterns overlap
        - targets: ["re:.*mlp\\.down_proj$"]
          scheme: FP8_DYNAMIC    # or bits/group_size/symmetric (default: the method's)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..presets import BLOCK_PRESETS, GROUP_SIZE_PRESETS, preset_scheme
from ..scheme import Scheme
from ..targets import Override, SchemeAssignment, check_patterns
from .base import QuantizerParams

PresetName = Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "W4A8", "W4AFP8", "FP8_DYNAMIC", "FP8_BLOCK",
                     "FP8_BLOCK_A16", "NVFP4A16", "NVFP4", "MXFP4A16"]
BlockStructure = tuple[Literal[64, 128], Literal[64, 128]]
_INT_FIELDS = ("bits", "symmetric")


def _check_preset_fields(preset: str | None, given: set[str], block: BlockStructure | None) -> None:
    """A preset fixes the number type; only its group size or block shape may be changed."""
    if preset is None:
        if block is not None:
            raise ValueError(f"block_structure needs scheme: one of {', '.join(BLOCK_PRESETS)}")
        return
    clash = [f for f in _INT_FIELDS if f in given]
    if clash:
        raise ValueError(f"scheme {preset} fixes {' and '.join(clash)}; remove {clash[0]} or the scheme")
    if "group_size" in given and preset not in GROUP_SIZE_PRESETS:
        raise ValueError(f"scheme {preset} has a fixed layout; group_size applies to {', '.join(GROUP_SIZE_PRESETS)}")
    if block is not None:
        if preset not in BLOCK_PRESETS:
            raise ValueError(f"block_structure applies to {', '.join(BLOCK_PRESETS)}, not {preset}")
        if block[0] != block[1]:
            raise ValueError(f"block_structure {list(block)}: FP8 blocks are square (activations are grouped "
                             "by the same edge)")


def _edge(block: BlockStructure | None) -> int | None:
    return None if block is None else block[0]


class SchemeOverrideSpec(BaseModel):
    """One override: the Linears it matches get this scheme instead of the method's."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    targets: list[str] = Field(min_length=1, description="Linears this applies to, as quantization.targets")
    preset: PresetName | None = Field(None, alias="scheme", description="a preset name")
    bits: Literal[4, 8] | None = None
    group_size: Literal[-1, 16, 32, 64, 128] | None = None
    symmetric: bool | None = None
    block_structure: BlockStructure | None = None

    @field_validator("targets")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return check_patterns(v)

    @model_validator(mode="after")
    def _consistent(self) -> "SchemeOverrideSpec":
        _check_preset_fields(self.preset, self.model_fields_set, self.block_structure)
        if self.preset is None and not self.model_fields_set & {"bits", "group_size", "symmetric"}:
            raise ValueError("an override needs scheme or at least one of bits, group_size, symmetric")
        return self


class SchemeParams(QuantizerParams):
    """Fields shared by methods that quantize onto any preset; subclasses define ``bits``,
    ``group_size`` and ``symmetric`` and how they make an int scheme (``int_scheme``)."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    preset: PresetName | None = Field(
        None, alias="scheme", description="Preset (FP8_BLOCK, NVFP4, NVFP4A16, MXFP4A16, W4AFP8, W4A8, ...) "
        "instead of bits/group_size/symmetric")
    block_structure: BlockStructure | None = Field(
        None, description="FP8 weight block [rows, columns] (default [128, 128]); square")
    overrides: list[SchemeOverrideSpec] = Field([], description="Per-pattern schemes; later entries win")

    @model_validator(mode="after")
    def _preset_fields(self) -> "SchemeParams":
        _check_preset_fields(self.preset, self.model_fields_set, self.block_structure)
        return self

    def int_scheme(self, bits: int, group_size: int, symmetric: bool) -> Scheme:
        raise NotImplementedError

    def finish(self, scheme: Scheme) -> Scheme:
        """A last touch the method puts on every scheme (GPTQ: act-order); none by default."""
        return scheme

    def scheme(self) -> Scheme:
        if self.preset is not None:
            group = self.group_size if "group_size" in self.model_fields_set else None  # type: ignore[attr-defined]
            return self.finish(preset_scheme(self.preset, group, _edge(self.block_structure)))
        return self.finish(self.int_scheme(self.bits, self.group_size, self.symmetric))  # type: ignore[attr-defined]

    def override_scheme(self, o: SchemeOverrideSpec) -> Scheme:
        if o.preset is not None:
            return self.finish(preset_scheme(o.preset, o.group_size, _edge(o.block_structure)))
        bits = self.bits if o.bits is None else o.bits  # type: ignore[attr-defined]
        group = self.group_size if o.group_size is None else o.group_size  # type: ignore[attr-defined]
        symmetric = self.symmetric if o.symmetric is None else o.symmetric  # type: ignore[attr-defined]
        return self.finish(self.int_scheme(bits, group, symmetric))

    def assignment(self) -> SchemeAssignment:
        overrides = tuple(Override(tuple(o.targets), self.override_scheme(o)) for o in self.overrides)
        return SchemeAssignment(self.scheme(), tuple(self.targets), tuple(self.ignore), overrides)
