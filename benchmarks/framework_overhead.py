"""Framework iteration time / a hand-written loop doing the same network passes.

1 rank (default): both run in this process on the same pixel UNet (ZeRO-0, fp32): the framework is
UniDAD.step with one DeepSpeed engine per trainable role; the hand loop is plain torch (AdamW, clipping)
making the same passes: student (K = 1), fake/source/target x0 for DMD, the GAN input-gradient, the fake step
(denoise + 2 discriminator passes), the target step.

2 ranks (``--nproc 2``): the script starts itself under torch.distributed.run on 127.0.0.1 (gloo on CPUs,
NCCL on GPUs, one rank per GPU); the framework runs every trainable role at ZeRO-2, the hand loop wraps each
trainable network in torch's DistributedDataParallel (its own loss through the DDP wrapper, other roles'
passes through the plain module, as the framework calls another role's network), the same passes per rank.
An iteration's time is the slowest rank's (each timed section starts at a barrier).

Iterations are interleaved (framework, hand-written, framework, ...); the ratio of medians is printed.

usage: python benchmarks/framework_overhead.py [--nproc 1|2] [--iterations 20] [--channels 64,128] [--batch 6]
       [--breakdown] [--deepspeed-config JSON]
goal: ratio <= 1.10 (the hand-written iteration must take >= 0.5 s here)
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


TRAINED = ("student", "fake_teacher", "target_teacher")


def hand_loop(models, cfg, rt, ddp: bool = False, spent: dict | None = None):
    """Plain-torch nets and optimizers (copies of the framework's initial networks, on the run's device) and one
    iteration. ``ddp``: each trainable network wrapped in DistributedDataParallel; a role's own loss goes through
    the wrapper (its gradients are all-reduced in the backward), another role's passes through the module.
    ``spent``: seconds of each role's backward and optimizer step (clipping included) are added to it."""
    from torch.nn.parallel import DistributedDataParallel

    from unidad_dist.methods import losses

    dev = rt.device
    sched = models.schedule
    nets = {r: copy.deepcopy(getattr(models, r).module).to(dev) for r in TRAINED}
    source = copy.deepcopy(models.source_teacher.module).to(dev)
    own = {r: DistributedDataParallel(n, device_ids=[dev.index] if dev.index is not None else None) if ddp else n
           for r, n in nets.items()}
    opts = {r: torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
            for r, n in nets.items()}
    real = models.data.model_space[: cfg.train.batch_size].clone().to(dev)
    while real.shape[0] < cfg.train.batch_size:
        real = torch.cat([real, real])[: cfg.train.batch_size]
    B, shape = cfg.train.batch_size, (cfg.train.batch_size,) + tuple(models.sample_shape)
    T = sched.T

    def randn():
        return torch.randn(shape, device=dev)

    def randint(lo, hi):
        return torch.randint(lo, hi, (B,), device=dev)

    def x0(net, x_t, t):
        return sched.to_x0(net(x_t, t, None).float(), x_t, t)

    def update(role, loss):
        t0 = time.perf_counter()
        loss.backward()
        t1 = _now(dev)
        torch.nn.utils.clip_grad_norm_(nets[role].parameters(), 10.0)
        opts[role].step()
        opts[role].zero_grad(set_to_none=True)
        if spent is not None:
            t2 = _now(dev)
            spent[f"{role}/backward"] = spent.get(f"{role}/backward", 0.0) + t1 - t0
            spent[f"{role}/step"] = spent.get(f"{role}/step", 0.0) + t2 - t1

    def iteration():
        z = randn()
        t0 = torch.full((B,), T - 1, dtype=torch.long, device=dev)
        x = x0(own["student"], z, t0)
        t = randint(20, 981)
        x_t = sched.add_noise(x.detach(), randn(), t)
        with torch.no_grad():
            x_fk = x0(nets["fake_teacher"], x_t, t)
            x_src = x0(source, x_t, t)
            x_trg = x0(nets["target_teacher"], x_t, t)
        x_in = x.detach().requires_grad_(True)
        tg = randint(0, T)
        logits = nets["fake_teacher"](sched.add_noise(x_in, randn(), tg), tg, None, discriminate=True)
        (g_gan,) = torch.autograd.grad(losses.gan_generator_loss(logits), x_in)
        loss = 0.5 * losses.dmd_loss(x, losses.dmd_gradient(x, x_fk, x_src)) \
            + 0.5 * losses.dmd_loss(x, losses.dmd_gradient(x, x_fk, x_trg)) \
            + cfg.gan_heads.lambda_g * losses.input_gradient_surrogate(x, g_gan)
        update("student", loss)
        x = x.detach()
        fake = own["fake_teacher"]
        n, tf = randn(), randint(0, T)
        l_f = losses.denoising_loss(fake(sched.add_noise(x, n, tf), tf, None), sched.target(x, n, tf))
        tr, tfk = randint(0, T), randint(0, T)
        l_d = losses.gan_discriminator_loss(
            fake(sched.add_noise(real, randn(), tr), tr, None, discriminate=True),
            fake(sched.add_noise(x, randn(), tfk), tfk, None, discriminate=True))
        update("fake_teacher", l_f + cfg.gan_heads.lambda_d * l_d)
        n, tt = randn(), randint(0, T)
        l_t = losses.denoising_loss(own["target_teacher"](sched.add_noise(real, n, tt), tt, None),
                                    sched.target(real, n, tt))
        update("target_teacher", l_t)

    return iteration


def _now(dev) -> float:
    from unidad_dist.device import synchronize

    synchronize(dev)
    return time.perf_counter()


def time_engine_calls(models, dev, spent: dict) -> None:
    """Add the seconds of each trainable role's ``backward`` and ``step`` (the engine's) to ``spent``."""
    for r in TRAINED:
        role = getattr(models, r)
        for name in ("backward", "step"):
            orig = getattr(role, name)

            def timed(*a, _orig=orig, _key=f"{r}/{name}", **k):
                _now(dev)
                t0 = time.perf_counter()
                out = _orig(*a, **k)
                spent[_key] = spent.get(_key, 0.0) + _now(dev) - t0
                return out
            setattr(role, name, timed)


def launch(args) -> int:
    """Start this script on ``--nproc`` ranks (torch.distributed.run, 127.0.0.1); rank 0 prints."""
    from unidad_dist.device import free_port

    rest, skip = [], False  # the ranks take the other options (torchrun would read --nproc as its own)
    for a in sys.argv[1:]:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), *rest]
    threads = max(1, (os.cpu_count() or 1) // args.nproc)  # the ranks share this machine's cores
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
                          ).returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--channels", default="64,128")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=6, help="per rank")
    ap.add_argument("--breakdown", action="store_true", help="also print each role's backward and optimizer-step "
                    "seconds (median per iteration) in both loops")
    ap.add_argument("--deepspeed-config", default=None, metavar="JSON",
                    help="a DeepSpeed JSON for every trainable role (<role>.deepspeed_config), e.g. other ZeRO "
                         "bucket sizes")
    ap.add_argument("--nproc", type=int, default=1, choices=(1, 2),
                    help="ranks: 1 (ZeRO-0 / plain loop) or 2 (ZeRO-2 / DDP loop)")
    args = ap.parse_args()
    if args.nproc > 1 and "RANK" not in os.environ:
        raise SystemExit(launch(args))
    from unidad_dist.device import runtime_from_env, synchronize
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    over = {"student.steps": 1, "algorithm.a": 0.5}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank started by launch() (which drops --nproc)
        over.update({f"{r}.zero_stage": 2 for r in TRAINED})
    if args.deepspeed_config:
        over.update({f"{r}.deepspeed_config": str(Path(args.deepspeed_config).resolve()) for r in TRAINED})
    cfg = common.config(channels=tuple(int(c) for c in args.channels.split(",")), resolution=args.resolution,
                        batch=args.batch, **over)
    rt = runtime_from_env()
    models = build(cfg, rt)
    hand_spent, fw_spent = ({}, {}) if args.breakdown else (None, None)
    hand = hand_loop(models, cfg, rt, ddp=rt.distributed, spent=hand_spent)
    method = UniDAD(cfg, models, rt)
    engines.attach(models, cfg, rt)
    if args.breakdown:
        time_engine_calls(models, rt.device, fw_spent)
    parts: dict = {"framework": {}, "hand-written": {}}
    params = sum(p.numel() for p in models.student.module.parameters())
    stages = {r: getattr(models, r).engine.zero_optimization_stage() for r in TRAINED}  # as the engines run

    def timed(fn) -> float:
        """Seconds of ``fn`` on the slowest rank (every rank starts it at a barrier)."""
        if rt.distributed:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        fn()
        synchronize(rt.device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            torch.distributed.all_reduce(dt, op=torch.distributed.ReduceOp.MAX)
        return float(dt.item())

    fw, hd = [], []
    for it in range(args.iterations + 2):  # 2 warm-up iterations of each, interleaved
        f_s = timed(lambda: method.step(it))
        h_s = timed(hand)
        if it >= 2:
            fw.append(f_s)
            hd.append(h_s)
            for name, spent, total in (("framework", fw_spent, f_s), ("hand-written", hand_spent, h_s)):
                if spent is not None:
                    for k, v in spent.items():
                        parts[name].setdefault(k, []).append(v)
                    parts[name].setdefault("forward passes and the rest", []).append(total - sum(spent.values()))
        for spent in (fw_spent, hand_spent):
            if spent is not None:
                spent.clear()
    if rt.is_main:
        f, h = statistics.median(fw), statistics.median(hd)
        zero = "/".join(sorted({f"ZeRO-{z}" for z in stages.values()}))
        if rt.distributed:
            what = (f"{rt.world_size} ranks ({rt.backend}, {rt.device.type}), framework at {zero} / hand-written "
                    "DistributedDataParallel loop")
        else:
            what = f"1 rank, framework at {zero} / hand-written plain-torch loop"
        print(f"UNet {params / 1e6:.2f} M params, batch {args.batch} per rank, {args.resolution}px, {what}, "
              f"{args.iterations} interleaved iterations (the slowest rank's time)")
        print(f"framework median {f:.3f} s, hand-written median {h:.3f} s")
        print(f"ratio framework / hand-written = {f / h:.3f}  (goal <= 1.10; hand-written >= 0.5 s: {h >= 0.5})")
        if args.breakdown:
            print(f"rank 0's seconds per iteration, median: {'part':34} {'framework':>10} {'hand-written':>13}")
            for k in sorted(parts["framework"]):
                a = statistics.median(parts["framework"][k])
                b = statistics.median(parts["hand-written"].get(k, [float("nan")]))
                print(f"{'':40} {k:34} {a:10.3f} {b:13.3f}")
    if rt.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    from unidad_dist.device import exit_process

    exit_process(0)  # a rank past its last collective: gloo could abort it at finalisation
