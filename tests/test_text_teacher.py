"""The built-in tiny text-conditioned teacher (builtin:text_teacher; issue 17's toy domain): each training
image is captioned with the shape it shows, the shipped weights are intact and clean, and the prompt steers
the samples (a ring's centre is empty, a disc's filled)."""
import pytest
import torch

from unidad_dist import builtin
from unidad_dist.eval.metrics import _structure


def test_render_shapes_names_the_shape_each_image_shows():
    """The captions come from these names: a name off by one image would teach the teacher wrong words."""
    g = torch.Generator().manual_seed(0)
    plain = builtin.render_shapes(builtin.DOMAINS["red_shapes"], 64, 32, torch.Generator().manual_seed(0))
    x, labels = builtin.render_shapes(builtin.DOMAINS["red_shapes"], 64, 32, g, return_labels=True)
    names = [lab["shape"] for lab in labels]
    assert torch.equal(x, plain)  # the same draws with or without the names (the demo teacher is unchanged)
    assert len(names) == 64 and set(names) == set(builtin.SHAPES)
    filled = _structure(x)["centre_filled"]
    ring = torch.tensor([n == "ring" for n in names])
    solid = torch.tensor([n in ("disc", "square") for n in names])
    assert filled[ring].mean() < 0.2 and filled[solid].mean() > 0.8, (filled, names)
    one, labels1 = builtin.render_shapes(builtin.DOMAINS["blue_discs"], 4, 16, g, return_labels=True)
    assert labels1 == [{"shape": "disc", "color": None}] * 4 and one.shape == (4, 3, 16, 16)
    # a palette: each image's colour name is the colour it shows (its mean over the shape's pixels)
    domain = builtin.DOMAINS["palette_shapes"]
    x, labels = builtin.render_shapes(domain, 64, 32, g, return_labels=True)
    assert set(lab["color"] for lab in labels) == set(domain["color"])
    mask = (x - x.median(dim=-1, keepdim=True).values.median(dim=-2, keepdim=True).values).norm(dim=1) > 0.3
    for img, m, lab in zip(x, mask, labels):
        shown = ((img[:, m] + 1) / 2).mean(dim=1)
        nearest = min(domain["color"], key=lambda c: (shown - torch.tensor(domain["color"][c])).norm())
        assert nearest == lab["color"], (lab, shown)


def test_pretraining_captions_each_image_with_its_shape(tmp_path, monkeypatch):
    """The prompts the text teacher trains on are "a <shape>" of the image each goes with (or empty, the
    caption dropout's share), encoded as the framework encodes them."""
    seen = []
    real_fn = builtin.text_encoder_fn

    def spy_fn(folder):
        enc = real_fn(folder)

        def encode(prompts):
            seen.append(list(prompts))
            return enc(prompts)
        return encode

    drawn = []
    real_render = builtin.render_shapes

    def spy_render(*a, **k):
        out = real_render(*a, **k)
        drawn.append(out[1])
        return out

    monkeypatch.setattr(builtin, "text_encoder_fn", spy_fn)
    monkeypatch.setattr(builtin, "render_shapes", spy_render)
    cfg = dict(builtin.TEXT_TEACHER, steps=3, warmup=1, batch=16, resolution=16, block_out_channels=[8, 16],
               norm_num_groups=4)
    builtin.pretrain_teacher(cfg, tmp_path / "t", progress=False)
    assert len(seen) == 3 and len(drawn) == 3
    for prompts, names in zip(seen, drawn):  # names: each image's labels
        assert all(p in ("", "a {color} {shape}".format(**lab)) for p, lab in zip(prompts, names))
        assert sum(p == "" for p in prompts) < len(prompts) // 2
    assert sum(p == "" for ps in seen for p in ps) > 0  # the dropout's empty prompts are there
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "t" / sub).is_dir()
    from unidad_dist.models.backbones import resolve_backbone

    spec = resolve_backbone(str(tmp_path / "t"), "concept_teacher")
    assert spec.kind == "sd15" and not spec.latent and spec.pixel_resolution == 16


@pytest.mark.slow
def test_the_shipped_text_teacher_is_clean_and_follows_its_prompt():
    from diffusers import UNet2DConditionModel

    from tools.build_demo_teacher import quality

    folder, why = builtin.shipped("text_teacher")
    assert folder is not None, why
    _, cfg = builtin.BUILTINS["text_teacher"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    q, bad = quality(unet, cfg, folder=folder)  # the build gate's 128 samples (fewer inflate the distance)
    assert bad == [], q
    x = builtin.teacher_samples(unet, cfg, 70, folder=folder)  # "a red disc", "a orange square", ... in turn
    prompts = builtin.teacher_prompts(cfg, 70)
    filled = _structure(x)["centre_filled"]
    disc = torch.tensor([p.endswith(" disc") for p in prompts])
    ring = torch.tensor([p.endswith(" ring") for p in prompts])
    assert filled[disc].mean() > filled[ring].mean() + 0.4, (filled[disc], filled[ring])
    # and the colour: the most saturated pixels of "a green ..." are greener than those of "a red ..."
    sat = x.max(dim=1).values - x.min(dim=1).values
    top = sat.flatten(1).topk(30, dim=1).indices
    salient = torch.gather(x.flatten(2), 2, top[:, None, :].expand(-1, 3, -1)).mean(dim=2)  # (N, 3)
    green = torch.tensor([" green " in p for p in prompts])
    red = torch.tensor([" red " in p for p in prompts])
    assert (salient[green, 1] - salient[green, 0]).mean() > (salient[red, 1] - salient[red, 0]).mean() + 0.5


def test_the_methods_table_runs_every_stage_of_the_baselines_on_the_text_teacher(tmp_path):
    """benchmarks/methods_table.py's chained baselines: every stage's primary backbone is the text teacher (a
    stage left on the demo teacher would compare methods across two teachers), the class word reaches each."""
    from benchmarks.methods_table import TEACHER, command
    from unidad_dist.launch.chain import load_chain
    from unidad_dist.methods.base import method_class

    for name in ("adapt_then_distill", "distill_then_adapt"):
        cmd, folders = command(name, tmp_path)
        i = cmd.index("--config")
        chain = load_chain(cmd[i + 1], cmd[i + 2:])
        assert [tmp_path / name / st.name for st in chain.stages] == folders
        for st in chain.stages:
            primary = method_class(st.cfg.algorithm.name).primary
            assert getattr(st.cfg, primary).backbone == TEACHER, (name, st.name)
            assert st.cfg.data.target.class_name == "disc"
    cmd, folders = command("opad", tmp_path)
    assert "demo_opad" in cmd and folders == [tmp_path / "opad"]
