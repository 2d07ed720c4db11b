"""Framework iteration time / a hand-written single-process loop doing the same network passes.

Both run in this process on the same pixel UNet (ZeRO-0, fp32, 1 rank): the framework is UniDAD.step with
one DeepSpeed engine per trainable role; the hand loop is plain torch (AdamW, clipping) making the same
passes: student (K = 1), fake/source/target x0 for DMD, the GAN input-gradient, the fake step (denoise + 2
discriminator passes), the target step. Iterations are interleaved; the ratio of medians is printed.

usage: python benchmarks/framework_overhead.py [--iterations 20] [--channels 64,128] [--batch 6]
goal: ratio <= 1.10 (the hand-written iteration must take >= 0.5 s here)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def hand_loop(models, cfg):
    """Plain-torch nets and optimizers (copies of the framework's initial networks) and one iteration."""
    from unidad_dist.methods import losses

    sched = models.schedule
    nets = {r: copy.deepcopy(getattr(models, r).module) for r in ("student", "fake_teacher", "target_teacher")}
    source = copy.deepcopy(models.source_teacher.module)
    opts = {r: torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
            for r, n in nets.items()}
    real = models.data.model_space[: cfg.train.batch_size].clone()
    while real.shape[0] < cfg.train.batch_size:
        real = torch.cat([real, real])[: cfg.train.batch_size]
    B, shape = cfg.train.batch_size, (cfg.train.batch_size,) + tuple(models.sample_shape)
    T = sched.T

    def x0(net, x_t, t):
        return sched.to_x0(net(x_t, t, None).float(), x_t, t)

    def update(role, loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets[role].parameters(), 10.0)
        opts[role].step()
        opts[role].zero_grad(set_to_none=True)

    def iteration():
        z = torch.randn(shape)
        t0 = torch.full((B,), T - 1, dtype=torch.long)
        x = x0(nets["student"], z, t0)
        t = torch.randint(20, 981, (B,))
        x_t = sched.add_noise(x.detach(), torch.randn(shape), t)
        with torch.no_grad():
            x_fk = x0(nets["fake_teacher"], x_t, t)
            x_src = x0(source, x_t, t)
            x_trg = x0(nets["target_teacher"], x_t, t)
        x_in = x.detach().requires_grad_(True)
        tg = torch.randint(0, T, (B,))
        logits = nets["fake_teacher"](sched.add_noise(x_in, torch.randn(shape), tg), tg, None, discriminate=True)
        (g_gan,) = torch.autograd.grad(losses.gan_generator_loss(logits), x_in)
        loss = 0.5 * losses.dmd_loss(x, losses.dmd_gradient(x, x_fk, x_src)) \
            + 0.5 * losses.dmd_loss(x, losses.dmd_gradient(x, x_fk, x_trg)) \
            + cfg.gan_heads.lambda_g * losses.input_gradient_surrogate(x, g_gan)
        update("student", loss)
        x = x.detach()
        fake = nets["fake_teacher"]
        n, tf = torch.randn(shape), torch.randint(0, T, (B,))
        l_f = losses.denoising_loss(fake(sched.add_noise(x, n, tf), tf, None), sched.target(x, n, tf))
        tr, tfk = torch.randint(0, T, (B,)), torch.randint(0, T, (B,))
        l_d = losses.gan_discriminator_loss(
            fake(sched.add_noise(real, torch.randn(shape), tr), tr, None, discriminate=True),
            fake(sched.add_noise(x, torch.randn(shape), tfk), tfk, None, discriminate=True))
        update("fake_teacher", l_f + cfg.gan_heads.lambda_d * l_d)
        n, tt = torch.randn(shape), torch.randint(0, T, (B,))
        l_t = losses.denoising_loss(nets["target_teacher"](sched.add_noise(real, n, tt), tt, None),
                                    sched.target(real, n, tt))
        update("target_teacher", l_t)

    return iteration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--channels", default="64,128")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()
    from unidad_dist.device import runtime_from_env
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    cfg = common.config(channels=tuple(int(c) for c in args.channels.split(",")), resolution=args.resolution,
                        batch=args.batch, **{"student.steps": 1, "algorithm.a": 0.5})
    rt = runtime_from_env()
    models = build(cfg, rt)
    hand = hand_loop(models, cfg)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    params = sum(p.numel() for p in models.student.module.parameters())
    fw, hd = [], []
    for it in range(args.iterations + 2):  # 2 warm-up iterations of each, interleaved
        t0 = time.perf_counter()
        method.step(it)
        t1 = time.perf_counter()
        hand()
        t2 = time.perf_counter()
        if it >= 2:
            fw.append(t1 - t0)
            hd.append(t2 - t1)
    f, h = statistics.median(fw), statistics.median(hd)
    print(f"UNet {params / 1e6:.2f} M params, batch {args.batch}, {args.resolution}px, {args.iterations} interleaved iterations")
    print(f"framework median {f:.3f} s, hand-written median {h:.3f} s")
    print(f"ratio framework / hand-written = {f / h:.3f}  (goal <= 1.10; hand-written >= 0.5 s: {h >= 0.5})")


if __name__ == "__main__":
    main()
