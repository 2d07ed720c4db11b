import torch

from unidad_dist import builtin
from unidad_dist.eval import metrics


def _shots(domain="blue_discs", n=10, seed=0):
    return builtin.render_shapes(builtin.DOMAINS[domain], n, 32, torch.Generator().manual_seed(seed))


def test_copies_are_detected_and_new_samples_are_not():
    shots = _shots()
    assert metrics.copy_rate(shots, shots) == 1.0
    assert metrics.copy_rate(shots.flip(-1), shots) == 1.0  # mirror copies count as copies
    assert metrics.copy_rate(_shots(seed=1, n=32), shots) < 0.2


def test_diversity_and_distance():
    shots = _shots()
    assert abs(metrics.diversity(shots, shots) - 1.0) < 1e-9
    assert metrics.diversity(shots[:1].repeat(8, 1, 1, 1) + 1e-3 * torch.randn(8, 3, 32, 32), shots) < 0.05
    same = metrics.proxy_distance(_shots(n=64, seed=2), shots)
    other = metrics.proxy_distance(builtin.render_shapes(builtin.DOMAINS["red_discs"], 64, 32,
                                                         torch.Generator().manual_seed(2)), shots)
    assert other > 5 * same


def test_domains_differ_in_colour_and_shape():
    for name in builtin.domain_names():
        imgs = builtin.render_shapes(builtin.DOMAINS[name], 4, 32, torch.Generator().manual_seed(0))
        assert imgs.shape == (4, 3, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
