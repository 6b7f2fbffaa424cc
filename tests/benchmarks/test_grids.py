"""Every Triton launch of an 800M step fills an H100: at least one program per multiprocessor (132)."""

import torch

from bitlaw.benchmarks.profile.grids import GROUPS, launches
from bitlaw.kernels.triton import quant


def test_every_launch_at_the_800m_shapes_is_at_least_one_full_wave():
    found = launches(sms=132, capability=90)
    kinds = {launch.kernel for launch in found}
    assert kinds == {"quantize", "dequantize", "masked_rotate", "grad_amax", "quantize_grad", "codes_t"}
    # Four activation quantizations per block (q/k/v and gate/up share theirs), seven weight quantizations.
    inputs = [launch for launch in found if launch.kernel == "quantize" and launch.tensor.endswith("input")]
    assert len(inputs) == len(GROUPS) == 4
    assert sum(launch.kernel == "quantize" for launch in found) == 4 + 7
    short = [launch for launch in found if launch.waves < 1]
    assert not short, short


def test_a_weight_of_few_rows_splits_its_columns():
    # down_proj's weight, 2048 × 5632 fp32, is read in two passes (44 blocks of 128 columns is not a power of two):
    # 64-row blocks alone would start 32 programs on 132 multiprocessors.
    assert quant.launch_config(torch.float32, 90, 5632)[0] == 64
    (rows, splits), chunk = quant.launch_grid(2048, 5632, torch.float32, 90, 132)
    assert rows == 32 and rows * splits >= 132 and chunk % 128 == 0 and (splits - 1) * chunk < 5632
    # Enough rows, or one pass: no split.
    assert quant.launch_grid(16384, 5632, torch.bfloat16, 90, 132)[0][1] == 1
    assert quant.launch_grid(2048, 2048, torch.float32, 90, 132)[0][1] == 1
