"""benchmarks/copy_rate.py's counting: the evaluation's copy criterion, per block and by nearest shot."""
import torch

from benchmarks.copy_rate import BLOCK, nearest_shot, report
from unidad_dist.eval.metrics import copy_rate


def test_copies_are_counted_by_the_evaluation_criterion_and_attributed_to_their_shot():
    g = torch.Generator().manual_seed(0)
    shots = torch.rand(10, 3, 8, 8, generator=g) * 2 - 1
    far = torch.rand(2 * BLOCK - 3, 3, 8, 8, generator=g) * 2 - 1
    # a near copy of shot 4, a mirror image of shot 7 (counted: the criterion includes mirrors), and shot 4 again
    near = torch.stack([shots[4] + 0.01, shots[7].flip(-1), shots[4]])
    samples = torch.cat([near, far])
    copies, idx = nearest_shot(samples, shots)
    assert copies[:3].all() and not copies[3:].any()
    assert idx[:3].tolist() == [4, 7, 4]
    out = report("t", samples, shots)
    assert out["copy_rate"] == copy_rate(samples, shots) == 3 / len(samples)
    assert out["by_shot"] == [0, 0, 0, 0, 2, 0, 0, 1, 0, 0]
    assert out["blocks"] == [3 / BLOCK, 0.0]
