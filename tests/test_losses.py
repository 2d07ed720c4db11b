import torch

from unidad_dist.methods import losses


def test_dmd_gradient_matches_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    x_fk, x_k = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    g = losses.dmd_gradient(x, x_fk, x_k)
    loss = losses.dmd_loss(x, g)
    loss.backward()
    # by hand, per sample: w = mean |x - x_k| over C, H, W; grad = (x_fk - x_k) / w / numel
    xd = x.detach()
    expected = torch.empty_like(xd)
    for i in range(3):
        w = (xd[i] - x_k[i]).abs().mean()
        expected[i] = (x_fk[i] - x_k[i]) / w / xd.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-9)


def test_dmd_normaliser_uses_sample_not_noisy_input():
    x = torch.ones(1, 1, 2, 2)
    x_k = torch.zeros(1, 1, 2, 2)
    g = losses.dmd_gradient(x, torch.full_like(x, 2.0), x_k)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))  # w = |1 - 0| = 1


def test_dmd_gradient_is_finite_and_clamped():
    x = torch.zeros(1, 1, 2, 2)
    g = losses.dmd_gradient(x, torch.full_like(x, float("nan")), x)  # w = 0 -> clamp 1e-8; nan -> 0
    assert torch.isfinite(g).all()


def test_input_gradient_surrogate_injects_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    g = torch.randn(2, 3)
    losses.input_gradient_surrogate(x, g).backward()
    torch.testing.assert_close(x.grad, g)


def test_gan_losses():
    z = torch.zeros(4)
    torch.testing.assert_close(losses.gan_generator_loss(z), torch.tensor(0.6931472))
    torch.testing.assert_close(losses.gan_discriminator_loss(z, z), torch.tensor(2 * 0.6931472))
    # non-zero logits: BCE(0, 1) = BCE(0, 0), so only these tell real (label 1) from fake (label 0)
    real = torch.tensor([2.0, -1.0, 0.5])
    fake = torch.tensor([-0.7, 1.5, 3.0])
    log_sig = lambda v: -torch.log1p(torch.exp(-v))  # noqa: E731  log σ(v)
    expect_d = (-log_sig(real)).mean() + (-log_sig(-fake)).mean()  # -log σ(real) - log(1 - σ(fake))
    torch.testing.assert_close(losses.gan_discriminator_loss(real, fake), expect_d)
    torch.testing.assert_close(losses.gan_generator_loss(fake), (-log_sig(fake)).mean())  # wants D(fake) = 1
    assert losses.gan_discriminator_loss(real + 1, fake - 1) < losses.gan_discriminator_loss(real, fake)
