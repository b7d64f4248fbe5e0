"""A written weight-only checkpoint's (W4A16, W8A16) group scales and norm weights tuned end to
end against its base model (``python -m quantkit tune``).

Every layer-wise lever measured on the best GPTQ row stayed inside the calibration draws' noise,
because the row's error compounds from layer to layer and no per-layer fit sees that. Tuning
the whole model's continuous parameters on KL(base ‖ quantized) over the calibration windows
(EfficientQAT's E2E-QP) does see it: on SmolLM2-135M it took the row from 0.65 of AutoRound's
perplexity increase to none in 128 steps, and to 0.09 of it in the default 32 (docs/quality.md,
stops 41 and 42). The integer codes and zero points stay
exactly as the quantizer chose them, so the checkpoint keeps its format and vLLM its kernels;
only each group's ``weight_scale`` (as ``s₀·exp(θ)``) and each norm's weight move.

Unlike ``run``, this holds the whole model twice on one device: the base as the target (2 bytes a
parameter on a GPU, 4 on the CPU; ``teacher_dtype``) and the quantized model as its integer codes
(1 byte a parameter, 2 at 8 bits; ``group_scaled``) with its scales, embeddings, norms and head in
float32: about 3 bytes a parameter in all on a GPU, plus one step's activations (66.6 GiB in all
at Llama-3.1-8B shapes, one window of 2048 tokens a step, measured: an 80 GB card holds it). So
it suits models that fit there, not the 70B that ``run`` streams.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeviceMemoryError, ExportError, ModelError, NumericsError
from .formats.packing import unpack_int32
from .group_scaled import GroupScaledLinear, group_weight
from .tune_attention import use_training_attention
from .tune_memory import products_dtype, steps_dtype, teacher_dtype
from .tune_settings import TuneSettings

TUNED_SUFFIX = ".tuning"  # a rewritten shard before it replaces the original
# The KL before and after is a report, not a stopping rule, so it is scored on the first windows
# up to this many tokens: 8 of the built-in default's 128 windows of 256 tokens, one of an 8B
# run's windows of 2048. Over all of its 128 windows the two passes cost four times the 32
# steps; over 4 windows of 2048 still 2.1 s of tune's 28 at Llama-3.1-8B shapes on an H200
# (docs/quality.md, stops 43 to 45).
KL_TOKENS = 2048


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of each position's next-token distribution, in nats."""
    target = F.log_softmax(teacher_logits.float(), -1)
    return F.kl_div(F.log_softmax(student_logits.float(), -1), target, log_target=True, reduction="none").sum(-1)


def packed_linears(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name: (codes less zero points, scale)`` of every pack-quantized Linear in ``tensors``, the
    former as ``steps_dtype(bits)`` (compressed-tensors' layout: unsigned codes, zero points
    packed along the rows; without zero points the codes are offset by ``2^(bits−1)``)."""
    out = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key[: -len(".weight_packed")]
        codes = unpack_int32(tensors[key], bits, dim=-1)
        scale = tensors[f"{name}.weight_scale"]
        group = codes.shape[1] // scale.shape[1]
        if f"{name}.weight_zero_point" in tensors:
            zero = unpack_int32(tensors[f"{name}.weight_zero_point"], bits, dim=-2)[: codes.shape[0]]
            steps = codes - zero.repeat_interleave(group, dim=1)
        else:
            steps = codes - 2 ** (bits - 1)
        out[name] = (steps.to(steps_dtype(bits)), scale)
    return out


def read_packed(checkpoint: Path, bits: int, device: torch.device
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.dtype]]:
    """``packed_linears`` of ``checkpoint`` on ``device`` and every tensor's stored dtype. Only
    the packed Linears' tensors are read; the others' dtypes come from the shards' headers (the
    cached reader the evaluation load validates them with). The words are unpacked where the
    student will be: on the CPU that took about 1 s a Llama-3.1-8B layer, nearly half of tune's
    time on an H200."""
    from safetensors import safe_open

    from .safetensors_dtypes import TORCH_DTYPES
    from .shard_check import read_entries

    stored: dict[str, torch.dtype] = {}
    packed: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        entries = read_entries(shard)
        stored.update({name: TORCH_DTYPES[e.dtype] for name, e in entries.items()})
        with safe_open(str(shard), "pt") as f:
            packed.update({name: f.get_tensor(name).to(device) for name in entries
                           if name.endswith((".weight_packed", ".weight_scale", ".weight_zero_point"))})
    return packed_linears(packed, bits), stored


def attach(model: nn.Module, linears: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device,
           checkpoint: str, products: torch.dtype) -> dict[str, GroupScaledLinear]:
    """Swap each of ``model``'s quantized Linears for a ``GroupScaledLinear`` of its codes, its
    dense weight dropped with it; that weight, as transformers decompressed it, must be what the
    codes give (up to its bf16 rounding), or the layout was misread. ``products``: the dtype
    of their products in training (``products_dtype``)."""
    scaled = {}
    for name, (steps, scale) in linears.items():
        # Looked up one at a time: a table of the model's modules would keep every swapped-out
        # Linear's weight alive until the last one is swapped.
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"{checkpoint}: {name}.weight_packed has no Linear of that name in the loaded model",
                             field="checkpoint", file=f"{name}.weight_packed")
        module = GroupScaledLinear(steps.to(device), scale.to(device),
                                   None if linear.bias is None else linear.bias.detach(), products)
        dense = group_weight(module.steps, module.scale, torch.float32)
        loaded = linear.weight.detach().float()
        if loaded.shape != dense.shape or ((loaded - dense).abs() - dense.abs() / 128).max().item() > 1e-6:
            raise ModelError(f"{checkpoint}: {name}'s codes times its scales are not the weight transformers "
                             "loads from it", field="checkpoint", file=f"{name}.weight_packed",
                             hint="tune reads compressed-tensors pack-quantized checkpoints with contiguous groups")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        scaled[name] = module
    return scaled


def load_student(checkpoint: Path, linears: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 label: str) -> tuple[nn.Module, dict[str, GroupScaledLinear]]:
    """``checkpoint``'s model as tune trains it, in eval mode, nothing trainable but the scales'
    ``theta``: its quantized Linears as their codes (``attach``, their training products in
    ``products_dtype``, and its attention in training too, ``tune_attention``), the rest in
    float32. It loads in the checkpoint's own dtype and the Linears are swapped before the rest
    is cast, so the dense model is never held in float32."""
    from .evaluate import load_for_evaluation
    from .model import read_config
    from .preflight import resolve_dtype

    dtype = resolve_dtype("auto", read_config(checkpoint / "config.json", quantized_ok=True))
    student, _ = load_for_evaluation(checkpoint, device, name=label, dtype=dtype)
    student.requires_grad_(False)
    products = products_dtype(device)
    scaled = attach(student, linears, device, label, products)
    use_training_attention(student, products)
    return student.float().eval(), scaled


def load_teacher(base_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model as tune's target: frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, trust_remote_code=False)
    return teacher.requires_grad_(False).to(device).eval()


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every normalization module's weight (``…norm.weight``), by checkpoint name."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if name.endswith("norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}


@contextmanager
def tensor_core_matmuls(device: torch.device) -> Iterator[None]:
    """float32 matmuls on a GPU's tensor cores (TF32 inputs, float32 sums) for the steps and the
    KL report: the steps took a quarter of the time at Llama-3.1-8B shapes on an H200, for the
    same quality (docs/quality.md, stop 43). Perplexities are scored outside, in full float32."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def tune(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, params: list[nn.Parameter],
         settings: TuneSettings, progress: Any = None) -> list[float]:
    """Adam on the mean next-token KL(teacher ‖ student); minibatches drawn from ``ids`` without
    replacement, epoch after epoch. Returns each step's loss."""
    opt = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses = []
    student.train()
    try:
        with tensor_core_matmuls(ids.device):
            for _ in range(settings.steps):
                if len(order) < settings.batch_size:
                    order += torch.randperm(len(ids), generator=gen).tolist()
                batch = ids[order[: settings.batch_size]]
                del order[: settings.batch_size]
                with torch.no_grad():
                    target = teacher(batch).logits[:, :-1]
                loss = next_token_kl(student(batch).logits[:, :-1], target).mean()
                if not math.isfinite(loss.item()):
                    raise NumericsError(f"tune: the KL became {loss.item()} at step {len(losses) + 1}; nothing was "
                                         "written", field="--lr", value=settings.lr, hint="try a smaller --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if progress is not None:
                    progress.set_postfix(kl=f"{loss.item():.4f}")
                    progress.update()
    finally:
        student.eval()
    return losses


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """The mean next-token KL(teacher ‖ student) over all of ``ids``' positions."""
    total, count = 0.0, 0
    with tensor_core_matmuls(ids.device):
        for batch in ids.split(batch_size):
            kl = next_token_kl(student(batch).logits[:, :-1], teacher(batch).logits[:, :-1])
            total, count = total + kl.sum().item(), count + kl.numel()
    return total / count


def tuned_tensors(scaled: dict[str, GroupScaledLinear], norms: dict[str, nn.Parameter],
                  stored: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors tuning changed, in their stored dtypes, on the CPU."""
    out = {f"{name}.weight_scale": p.stored_scale().detach().cpu().contiguous() for name, p in scaled.items()}
    out.update({name: w.detach().to(stored[name]).cpu().contiguous() for name, w in norms.items()})
    return out


class ShardCopies:
    """Each of a folder's safetensors shards copied beside itself by a background thread, started
    before tuning so that the copy (most of the rewrite's time: 6.7 of tune's 31 s at
    Llama-3.1-8B shapes, docs/quality.md, stop 44) runs while the device tunes; ``rewrite_shards``
    then writes the tuned bytes into the copies."""

    def __init__(self, folder: Path):
        import shutil

        self.folder = folder
        self.pairs = [(shard.with_name(shard.name + TUNED_SUFFIX), shard)
                      for shard in sorted(folder.glob("*.safetensors"))]
        # Checked before the steps, which take minutes on a CPU: a full disk met by the copy
        # would otherwise surface only at the rewrite, after them.
        need, free = sum(shard.stat().st_size for _, shard in self.pairs), shutil.disk_usage(folder).free
        if need > free:
            raise ExportError(f"{folder}: tune writes each shard's copy beside it before replacing it, "
                              f"{need / 1e6:.1f} MB in all, and {free / 1e6:.1f} MB are free there; nothing was "
                              "written", file=folder, hint="free disk space there, then run quantkit tune again")
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, name="quantkit-tune-copies", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        import shutil

        try:
            for tmp, shard in self.pairs:
                if self._stop.is_set():
                    return
                shutil.copyfile(shard, tmp)
                # Written back now, while the device tunes: left to the kernel, the write-back
                # starts about 30 s later, near the rewrite, whose writes into pages under
                # write-back then wait for the disk (half of a rewrite's second at 5 GB, stop 45).
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        except BaseException as e:  # re-raised in the caller's thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until every copy is written; the copy's own error, if any, raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def discard(self) -> None:
        """Stop copying and remove every copy left (none once ``rewrite_shards`` has renamed them)."""
        self._stop.set()
        self._thread.join()
        for tmp, _ in self.pairs:
            tmp.unlink(missing_ok=True)


@contextmanager
def shard_copies(folder: Path) -> Iterator[ShardCopies]:
    """``ShardCopies`` of ``folder``, all removed if the block fails, so a failed tune leaves the
    checkpoint as it was and no partial file behind."""
    copies = ShardCopies(folder)
    try:
        yield copies
    except BaseException:
        copies.discard()
        raise
    copies.discard()  # the untouched shards' copies


def rewrite_shards(copies: ShardCopies, changed: dict[str, torch.Tensor]) -> list[str]:
    """Replace ``changed`` tensors in the shards ``copies`` copied, all or nothing.

    A tuned tensor keeps its name, dtype and shape, so its bytes take the place of the old ones
    in the copy and nothing else in the file moves (decoding and re-encoding every tensor cost
    more than the copy); each passes the checks the checkpoint writer makes of what it stores.
    Only when every touched copy is written do they replace the originals
    (renames); an error before that is raised with the originals unchanged, and ``shard_copies``
    removes the copies."""
    from .finite_check import check_written
    from .safetensors_dtypes import DTYPE_NAMES
    from .shard_check import read_entries

    copies.wait()
    remaining = dict(changed)
    touched: list[tuple[Path, Path]] = []
    for tmp, shard in copies.pairs:
        entries = read_entries(shard)
        mine = {name: remaining.pop(name) for name in entries.keys() & remaining.keys()}
        if not mine:
            continue
        for name, t in mine.items():
            entry = entries[name]
            if DTYPE_NAMES.get(t.dtype) != entry.dtype or tuple(t.shape) != entry.shape:
                raise ExportError(f"{shard}: {name} is {entry.dtype} {list(entry.shape)} there but tuning gave "
                                  f"{t.dtype} {list(t.shape)}; nothing was rewritten", file=shard)
            check_written(name, t)  # the checkpoint writer's own gate: finite, scales positive
        touched.append((tmp, shard))
        with open(tmp, "r+b") as f:
            for name in sorted(mine, key=lambda n: entries[n].begin):
                f.seek(entries[name].begin)
                f.write(mine[name].contiguous().view(-1).view(torch.uint8).numpy())  # its bytes, not a copy
    if remaining:
        raise ExportError(f"{copies.folder}: no shard holds {sorted(remaining)[0]}; nothing was rewritten",
                          file=sorted(remaining)[0])
    for tmp, shard in touched:
        tmp.replace(shard)
    return [shard.name for _, shard in touched]


def tune_checkpoint(checkpoint: Path, base_dir: Path, calibration: list[torch.Tensor], settings: TuneSettings,
                    device: torch.device, evaluation: list[torch.Tensor] | None = None,
                    name: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Tune ``checkpoint`` (a folder ``run`` wrote) against the base model in ``base_dir`` on
    ``calibration``'s windows and rewrite its scales and norm weights in place. Returns what
    report.json records: the settings, the KL before and after on the calibration windows and,
    with ``evaluation``, the perplexity of base, quantized and tuned there (the quantized and
    tuned models in float32, which the run's own numbers on a GPU are not; the base in
    ``base_dtype``)."""
    from .model import read_config
    from .preflight import resolve_dtype

    label = name or str(checkpoint)
    config = read_config(checkpoint / "config.json", quantized_ok=True)
    began = time.perf_counter()
    bits = packed_bits(config, label, checkpoint)
    base_dtype = teacher_dtype(device, resolve_dtype("auto", read_config(base_dir / "config.json")))
    try:
        with shard_copies(checkpoint) as copies:
            linears, stored = read_packed(checkpoint, bits, device)
            report, changed = _tune_in_memory(checkpoint, label, base_dir, base_dtype, linears, stored, calibration,
                                              evaluation, settings, device, quiet)
            rewrite_shards(copies, changed)
    except torch.OutOfMemoryError:
        held = str(base_dtype).removeprefix("torch.")
        raise DeviceMemoryError(
            f"{label}: out of memory on {device} holding the base model in {held} and the quantized "
            f"one as its codes (about {base_dtype.itemsize + steps_dtype(bits).itemsize} bytes a "
            f"parameter) and a step of {settings.batch_size} windows; nothing was written",
            field="--batch-size", value=settings.batch_size,
            hint="lower --batch-size, or tune where both models fit (--device cpu uses host memory)") from None
    report["seconds"] = time.perf_counter() - began
    return report


def _tune_in_memory(checkpoint: Path, label: str, base_dir: Path, base_dtype: torch.dtype,
                    linears: dict[str, tuple[torch.Tensor, torch.Tensor]], stored: dict[str, torch.dtype],
                    calibration: list[torch.Tensor], evaluation: list[torch.Tensor] | None, settings: TuneSettings,
                    device: torch.device, quiet: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The models loaded, tuned and measured: the report and the tensors to write."""
    from tqdm.auto import tqdm

    from .engine import perplexity

    student, scaled = load_student(checkpoint, linears, device, label)
    norms = norm_weights(student)
    missing = sorted(set(norms) - set(stored))
    if missing:
        raise ModelError(f"{label}: the loaded model has {missing[0]}, which no shard holds", field="checkpoint",
                         file=missing[0])
    for w in norms.values():
        w.requires_grad_(True)
    teacher = load_teacher(base_dir, device, base_dtype)

    ppl: dict[str, float] = {}
    ev = None if not evaluation else torch.stack(evaluation).to(device)

    def score(key: str, model: nn.Module) -> None:
        if ev is not None:
            with torch.no_grad():
                ppl[key] = perplexity((model(b).logits[:, :-1], b) for b in ev.split(settings.batch_size))

    score("perplexity_base", teacher)
    score("perplexity_before", student)
    ids = torch.stack(calibration).to(device)
    scored = ids[: max(1, KL_TOKENS // ids.shape[1])]
    kl_before = mean_kl(student, teacher, scored, settings.batch_size)
    with tqdm(total=settings.steps, desc="tune scales and norms", unit="step", disable=quiet) as bar:
        losses = tune(student, teacher, ids, [p.theta for p in scaled.values()] + list(norms.values()), settings,
                      bar)
    kl_after = mean_kl(student, teacher, scored, settings.batch_size)
    report: dict[str, Any] = {
        "steps": settings.steps, "lr": settings.lr, "batch_size": settings.batch_size, "seed": settings.seed,
        "base_dtype": str(base_dtype).removeprefix("torch."), "windows": len(calibration),
        "seq_len": int(ids.shape[1]), "linears": len(scaled), "norms": len(norms), "kl_windows": len(scored),
        "kl_before": kl_before, "kl_after": kl_after, "loss_first_step": losses[0], "loss_last_step": losses[-1],
    }
    score("perplexity_tuned", student)
    if ev is not None:
        report.update(ppl, eval_windows=len(ev))
    return report, tuned_tensors(scaled, norms, stored)


def packed_bits(config: dict[str, Any], label: str, checkpoint: Path) -> int:
    """The one integer weight width of a weight-only pack-quantized checkpoint, or why not
    (checked before the base model or any text is loaded)."""
    qc = config.get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values())
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized" or len(groups) != 1:
        raise ModelError(f"{label}: tune reads compressed-tensors pack-quantized checkpoints of one scheme "
                         f"(int4/int8 weights, 16-bit activations); this one is "
                         f"{qc.get('quant_method')!r} {qc.get('format')!r} with {len(groups)} scheme(s)",
                         field="checkpoint", file=checkpoint / "config.json",
                         hint="export with format compressed-tensors and a weight-only int scheme (W4A16, W8A16)")
    if groups[0].get("input_activations"):
        raise ModelError(f"{label}: its activations are quantized; tune handles weight-only schemes",
                         field="checkpoint", file=checkpoint / "config.json")
    if qc.get("transform_config"):
        raise ModelError(f"{label}: its online_down_proj transform is applied by vLLM, not by the model tune "
                         "trains", field="checkpoint", file=checkpoint / "config.json")
    return int(groups[0]["weights"]["num_bits"])
