"""One-off check of the plain-torch evaluation networks (unidad_dist/eval/networks.py) against the reference
implementations: pytorch-fid's InceptionV3 (+ its calculate_frechet_distance) and lpips' LPIPS(net='vgg').
Both need torchvision, which cannot be imported beside the project's torch, so this runs in a separate
virtualenv that has a working torch/torchvision pair:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy pillow
    /tmp/refvenv/bin/pip install --no-deps pytorch-fid==0.3.0 lpips==0.1.4
    /tmp/refvenv/bin/python tools/check_eval_networks.py [--write-fixture tests/data/eval_reference.json]

Both sides get the same deterministic stand-in weights (tests/eval_fixtures.seeded_state, written in the
official key layouts; LPIPS also with the lpips package's real heads); nothing is downloaded. Prints the
max abs difference of the pool3 features, the FID of two image sets by both, and the LPIPS values by both.
``--write-fixture`` stores the official key sets and shapes and the reference outputs that the CI tests
(tests/test_eval_networks.py) reproduce without torchvision.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-fixture", default=None, help="write key sets + reference outputs to this JSON")
    args = ap.parse_args()

    import lpips as lpips_pkg
    import numpy as np
    import pytorch_fid.inception as pfi
    import torch
    import torchvision
    from pytorch_fid.fid_score import calculate_frechet_distance

    from eval_fixtures import seeded_images, seeded_state
    from unidad_dist.eval import networks, paper

    torch.set_num_threads(2)
    print(f"reference: torch {torch.__version__}, torchvision {torchvision.__version__}, pytorch-fid "
          f"{getattr(sys.modules['pytorch_fid'], '__version__', '?')}, lpips {getattr(lpips_pkg, '__version__', '?')}")
    tmp = Path(tempfile.mkdtemp())

    # --- Inception: the official layout is what pytorch-fid's fid_inception_v3 loads strictly ---------------
    skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfi.FIDInceptionE_1(1280)), ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
        setattr(skeleton, name, block)
    inc_shapes = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    inc_state = seeded_state(inc_shapes)
    pfi.load_state_dict_from_url = lambda *a, **k: inc_state  # pytorch-fid's own loader, given our weights
    ref_inc = pfi.InceptionV3([3]).eval()
    inc_file = tmp / "pt_inception.pth"
    torch.save(inc_state, inc_file)
    ours_inc = networks.load_inception(networks.Located(networks.SPECS["inception"], path=inc_file))

    x = seeded_images(6, 64, seed=1)
    x01 = paper.to_uint8(x).float() / 255
    with torch.no_grad():
        f_ref = ref_inc(x01)[0].squeeze(-1).squeeze(-1).double()
        f_ours = ours_inc(x01).double()
    print(f"Inception pool3: max |ours - pytorch-fid| = {float((f_ref - f_ours).abs().max()):.3e} "
          f"(features' max |f| {float(f_ref.abs().max()):.3f})")

    # FID of two sets by both (features of N + N images at 32 px)
    n_fid = 12
    a, b = seeded_images(n_fid, 32, seed=2), (seeded_images(n_fid, 32, seed=3) * 0.7).clamp(-1, 1)
    with torch.no_grad():
        fa_ref = ref_inc(paper.to_uint8(a).float() / 255)[0].flatten(1).double()
        fb_ref = ref_inc(paper.to_uint8(b).float() / 255)[0].flatten(1).double()
    fa, fb = paper.inception_features(ours_inc, paper.to_uint8(a)), paper.inception_features(ours_inc, paper.to_uint8(b))
    sa, sb = paper.FidStats.of(fa), paper.FidStats.of(fb)
    na, nb = fa_ref.numpy(), fb_ref.numpy()
    fid_ref = calculate_frechet_distance(na.mean(0), np.cov(na, rowvar=False), nb.mean(0), np.cov(nb, rowvar=False))
    fid_ours = paper.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    print(f"FID ({n_fid} vs {n_fid} images): ours {fid_ours:.6f}, pytorch-fid {fid_ref:.6f}, |diff| {abs(fid_ours - fid_ref):.3e}")

    # --- LPIPS-VGG: lpips' own network with a stand-in trunk (and its real heads, then stand-in heads) ------
    vgg_shapes = {k: list(v.shape) for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    vgg_state = seeded_state(vgg_shapes)
    vgg_file = tmp / "vgg16.pth"
    torch.save(vgg_state, vgg_file)
    heads_file = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    heads_shapes = {k: list(v.shape) for k, v in torch.load(heads_file, map_location="cpu", weights_only=True).items()}
    seeded_heads = seeded_state(heads_shapes)
    seeded_heads_file = tmp / "heads.pth"
    torch.save(seeded_heads, seeded_heads_file)

    def reference_lpips(heads: dict):
        net = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        trunk = {}
        for i, sl in enumerate([net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5]):
            for name, _ in sl.state_dict().items():
                trunk[f"net.slice{i + 1}.{name}"] = vgg_state[f"features.{name}"]
        net.load_state_dict({**trunk, **heads}, strict=False)
        return net.eval()

    p, q = seeded_images(8, 32, seed=4), seeded_images(8, 32, seed=5)
    outs = {}
    for label, heads, hfile in [("lpips' heads", torch.load(heads_file, map_location="cpu", weights_only=True), heads_file),
                                ("stand-in heads", seeded_heads, seeded_heads_file)]:
        ref = reference_lpips(heads)
        ours = networks.load_lpips(networks.Located(networks.SPECS["vgg16"], path=vgg_file),
                                   networks.Located(networks.SPECS["lpips_heads"], path=hfile))
        with torch.no_grad():
            d_ref = ref(p, q).flatten().double()
            d_ours = ours(p, q).double()
        outs[label] = d_ref
        print(f"LPIPS ({label}): ours {[round(v, 6) for v in d_ours.tolist()[:4]]}..., lpips "
              f"{[round(v, 6) for v in d_ref.tolist()[:4]]}...; max |diff| {float((d_ref - d_ours).abs().max()):.3e}")

    if args.write_fixture:
        fixture = {
            "made_by": "tools/check_eval_networks.py with " + f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                       "pytorch-fid 0.3.0, lpips 0.1.4",
            "inception_keys": inc_shapes, "vgg16_keys": vgg_shapes, "lpips_heads_keys": heads_shapes,
            "inception_input": {"n": 6, "size": 64, "seed": 1},
            "inception_pool3": [[round(v, 6) for v in row] for row in f_ref.tolist()],
            "fid_sets": {"a": {"n": n_fid, "size": 32, "seed": 2}, "b": {"n": n_fid, "size": 32, "seed": 3, "scale": 0.7}},
            "fid": fid_ref,
            "lpips_input": {"p": {"n": 8, "size": 32, "seed": 4}, "q": {"n": 8, "size": 32, "seed": 5}},
            "lpips_stand_in_heads": outs["stand-in heads"].tolist(),
        }
        Path(args.write_fixture).write_text(json.dumps(fixture))
        print(f"wrote {args.write_fixture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
