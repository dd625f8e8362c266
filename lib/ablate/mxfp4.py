"""MXFP4 expert tensors of original GPT-OSS checkpoints, dequantised as transformers' loader does.

A packed tensor comes as `NAME_blocks` (uint8 [experts, rows, groups, 16]: 32 FP4 codes per group,
two per byte, low nibble first) and `NAME_scales` (uint8 [experts, rows, groups]: a shared power of
two per group, biased by 127). Dequantising gives [experts, rows, groups * 32] and, as in
transformers' `convert_moe_packed_tensors`, the last two axes are swapped: the result has the
orientation of the BF16 checkpoints (`down_proj` [experts, intermediate, hidden], `gate_up_proj`
[experts, hidden, 2 * intermediate]).

Every FP4 value times a power of two is exactly representable in bfloat16, so dequantising to
bfloat16 loses nothing.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
DEQUANTIZED_DTYPE = torch.bfloat16


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, int, int]:
    experts, rows, groups, bytes_per_group = blocks_shape
    return experts, groups * bytes_per_group * 2, rows


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = DEQUANTIZED_DTYPE
) -> torch.Tensor:
    """[experts, rows, groups, 16] codes and [experts, rows, groups] scales -> [experts, groups * 32, rows]."""
    if blocks.dim() != 4 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    lookup = torch.tensor(FP4_VALUES, dtype=torch.float32)
    experts, rows, groups, bytes_per_group = blocks.shape
    result = torch.empty(dequantized_shape(tuple(blocks.shape)), dtype=dtype)
    # One expert at a time keeps the temporaries (indices, float32 values) a small fraction of the result.
    for expert in range(experts):
        codes = blocks[expert].to(torch.uint8)
        low = lookup[(codes & 0x0F).long()]
        high = lookup[(codes >> 4).long()]
        values = torch.stack((low, high), dim=-1).reshape(rows, groups, bytes_per_group * 2)
        exponents = scales[expert].to(torch.int32).sub(SCALE_BIAS).unsqueeze(-1)
        values = torch.ldexp(values, exponents.to(torch.float32)).reshape(rows, groups * bytes_per_group * 2)
        result[expert].copy_(values.transpose(0, 1))
    return result
