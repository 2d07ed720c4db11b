"""Dense peak FLOP/s of known accelerators, for MFU (model FLOPs utilisation).

Matched on the name the driver reports (``torch.cuda.get_device_name``). The numbers are the vendors' datasheet
figures for *dense* math (NVIDIA prints tensor-core figures "with sparsity"; dense is half of those), in TFLOP/s:

* ``bf16`` / ``fp16``: 16-bit tensor-core math with fp32 accumulation (what PyTorch runs);
* ``tf32``: fp32 tensors on tensor cores (TF32), None where the chip has none;
* ``fp32``: plain fp32 math (no tensor cores).

An unknown device, a CPU, or a precision the chip has no figure for gives no peak: callers then report achieved
FLOP/s only, never an MFU against a made-up number. Add a device by adding a row with its datasheet's numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16: Optional[float]  # TFLOP/s, dense
    fp16: Optional[float]
    tf32: Optional[float]
    fp32: Optional[float]


# (pattern on the reported name, case-insensitive; first match wins, so variants come before their family)
PEAKS: list[tuple[str, DevicePeak]] = [
    # NVIDIA B200, HGX (1,000 W) — the datasheet's per-GPU column: FP16/BF16 4.5 PF*, TF32 2.2 PF*, FP32 75 TF
    # (checked 2026-12 against the HGX B200 specification table; GB200's 1,200 W part is faster: not this row)
    (r"\bB200\b", DevicePeak("B200", 2250.0, 2250.0, 1100.0, 75.0)),
    # NVIDIA H200 NVL datasheet: BF16/FP16 1,671 TF*, TF32 835 TF* (* sparsity), FP32 60 TF
    (r"\bH200\b.*\bNVL\b", DevicePeak("H200 NVL", 835.5, 835.5, 417.5, 60.0)),
    # NVIDIA H200 (SXM) datasheet: BF16/FP16 1,979 TF*, TF32 989 TF*, FP32 67 TF; GH200 datasheet: the same
    (r"\bG?H200\b", DevicePeak("H200", 989.5, 989.5, 494.5, 67.0)),
    # NVIDIA H100 NVL datasheet (per GPU): BF16/FP16 1,671 TF*, TF32 835 TF*, FP32 60 TF
    (r"\bH100\b.*\bNVL\b", DevicePeak("H100 NVL", 835.5, 835.5, 417.5, 60.0)),
    # NVIDIA H100 PCIe datasheet: BF16/FP16 1,513 TF*, TF32 756 TF*, FP32 51 TF
    (r"\bH100\b.*\bPCIe\b", DevicePeak("H100 PCIe", 756.5, 756.5, 378.0, 51.0)),
    # NVIDIA H100 SXM datasheet ("H100 80GB HBM3"): BF16/FP16 1,979 TF*, TF32 989 TF*, FP32 67 TF
    (r"\bH100\b", DevicePeak("H100 SXM", 989.5, 989.5, 494.5, 67.0)),
    # NVIDIA A100 datasheet (SXM4 and PCIe, 40 and 80 GB): BF16/FP16 312 TF, TF32 156 TF, FP32 19.5 TF
    (r"\bA100\b", DevicePeak("A100", 312.0, 312.0, 156.0, 19.5)),
    # NVIDIA L40S datasheet: BF16/FP16 362.05 TF (733 TF*), TF32 183 TF (366 TF*), FP32 91.6 TF
    (r"\bL40S\b", DevicePeak("L40S", 362.05, 362.05, 183.0, 91.6)),
    # NVIDIA L40 datasheet: BF16/FP16 181.05 TF (362.1 TF*), TF32 90.5 TF (181 TF*), FP32 90.5 TF
    (r"\bL40\b", DevicePeak("L40", 181.05, 181.05, 90.5, 90.5)),
    # NVIDIA L4 datasheet: BF16/FP16 242 TF*, TF32 120 TF*, FP32 30.3 TF
    (r"\bL4\b", DevicePeak("L4", 121.0, 121.0, 60.0, 30.3)),
    # NVIDIA A10 datasheet: BF16/FP16 125 TF (250 TF*), TF32 62.5 TF (125 TF*), FP32 31.2 TF. Not the A10G
    # (AWS's part, no NVIDIA datasheet with tensor figures): unknown, so no MFU there.
    (r"\bA10\b(?!G)", DevicePeak("A10", 125.0, 125.0, 62.5, 31.2)),
    # NVIDIA V100 datasheet: tensor (fp16) 125 / 112 / 130 TF (SXM2 / PCIe / V100S), FP32 15.7 / 14 / 16.4 TF;
    # no bf16 or tf32 tensor math
    (r"\bV100S\b", DevicePeak("V100S", None, 130.0, None, 16.4)),
    (r"\bV100\b.*\bPCIE\b", DevicePeak("V100 PCIe", None, 112.0, None, 14.0)),
    (r"\bV100\b", DevicePeak("V100 SXM2", None, 125.0, None, 15.7)),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TF,
    # TF32 82.6 TF, FP32 82.6 TF (not the 4090 D)
    (r"\bRTX 4090\b(?! ?D\b)", DevicePeak("RTX 4090", 165.2, 165.2, 82.6, 82.6)),
    # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: FP16/BF16 tensor with FP32 accumulate 71 TF, TF32 35.6 TF,
    # FP32 35.6 TF (not the 3090 Ti)
    (r"\bRTX 3090\b(?! ?Ti\b)", DevicePeak("RTX 3090", 71.0, 71.0, 35.6, 35.6)),
    # AMD Instinct MI300X datasheet: BF16/FP16 1,307.4 TF (dense), TF32 653.7 TF, FP32 matrix 163.4 TF
    (r"\bMI300X\b", DevicePeak("MI300X", 1307.4, 1307.4, 653.7, 163.4)),
]


def device_peak(name: str) -> Optional[DevicePeak]:
    """The table's row for a device name as the driver reports it, or None (unknown: no MFU)."""
    for pattern, peak in PEAKS:
        if re.search(pattern, name or "", flags=re.IGNORECASE):
            return peak
    return None


def math_kind(precision: str, tf32: bool) -> str:
    """Which peak a role's network runs against: its recipe precision (fp32 | bf16_autocast | bf16 | fp16), an
    fp32 role at the TF32 peak when PyTorch lets matmuls or convolutions use TF32 (``tf32``)."""
    if precision in ("bf16", "bf16_autocast"):
        return "bf16"
    if precision == "fp16":
        return "fp16"
    return "tf32" if tf32 else "fp32"


def tf32_enabled() -> bool:
    """Whether fp32 matmuls or convolutions may run on TF32 tensor cores in this process."""
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def peak_flops(peak: Optional[DevicePeak], kind: str) -> Optional[float]:
    """FLOP/s of one device for one kind of math (``math_kind``), or None when there is no figure."""
    if peak is None:
        return None
    tflops = getattr(peak, kind)
    return None if tflops is None else tflops * 1e12
