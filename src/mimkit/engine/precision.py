"""Which autocast dtype a run uses: `misc.amp` auto | bf16 | fp16 | off, resolved once per device.

`auto` picks bf16 on a GPU that supports it and on a CPU with native bf16 units (AVX-512 BF16 or AMX-BF16, as
torch reports them), else fp32. Autocast keeps parameters, gradients and optimiser state in fp32; the loop
computes the loss value in fp32 and checkpoints hold fp32 weights.
"""

from __future__ import annotations

import torch

# The --amp flag's help, shared by every command that takes it.
AMP_HELP = ("auto (bf16 on a GPU with bf16 or a CPU with AVX-512 BF16 / AMX-BF16, else fp32) | bf16 | "
            "fp16 (GPU only: fp32 on a CPU) | off (fp32)")

# Ranks for the rollback fallback: a later entry is at least as precise as an earlier one.
PRECISION_ORDER = ("fp16", "bf16", "off")


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU, which feature says so): AVX-512 BF16 or AMX-BF16 as torch detects them."""
    caps: dict = {}
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = dict(get())
        except Exception:  # noqa: BLE001  (older builds without cpuinfo)
            caps = {}
    if not caps:  # older torch: the private per-feature probes
        for key, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
            fn = getattr(torch.cpu, probe, None)
            caps[key] = bool(fn()) if fn is not None else False
    found = [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512 BF16")) if caps.get(key)]
    if found:
        return True, f"the CPU reports {' and '.join(found)}"
    return False, "the CPU reports neither AVX-512 BF16 nor AMX-BF16"


def amp_decision(amp: str, device: torch.device) -> tuple[str, str]:
    """Resolve `misc.amp` for `device` -> (bf16 | fp16 | off, why), the why fit for the start-up line."""
    if amp == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16", "auto: the GPU supports bf16"
            return "off", "auto: the GPU has no bf16"
        if device.type == "cpu":
            ok, why = cpu_bf16_support()
            return ("bf16", f"auto: {why}") if ok else ("off", f"auto: {why}, so fp32")
        return "off", f"auto: fp32 on {device.type}"
    if amp == "fp16" and device.type != "cuda":
        return "off", "fp16 needs a GPU: fp32 on this device (use --amp bf16 for reduced precision on a CPU)"
    return amp, f"--amp {amp} as asked"


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device has native bf16 (GPU or CPU), else off; fp16 on CPU falls back to off."""
    return amp_decision(amp, device)[0]


def describe_amp(amp: str, device: torch.device) -> str:
    """The start-up line's precision part: 'amp bf16 (auto: the CPU reports AVX-512 BF16)'."""
    value, why = amp_decision(amp, device)
    return f"amp {value} ({why})"


def autocast_dtype(amp: str):
    """torch dtype of a resolved amp value (None = no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
