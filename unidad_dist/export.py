"""``unidad-dist export``: the method's sampler role (Uni-DAD: the student) as a diffusers folder that a plain
pipeline call samples correctly.

Layout of ``--out``::

    unet/                  the student UNet (safetensors; the EMA weights when the run kept an EMA; a LoRA
                           student's adapter merged into the base weights)
    scheduler/             an LCMScheduler that reproduces our K-step sampler: the trained timesteps
                           (t_k = T-1 - k*floor(T/K) come out of set_timesteps(K) with
                           original_inference_steps = T), the student's output type (x0 -> "sample",
                           else the backbone's epsilon / v_prediction), no clipping, and c_skip = 0 /
                           c_out = 1 (timestep_scaling large), i.e. x̂0 is re-noised with fresh noise;
                           steps_offset = 1 (LCMScheduler ignores it; Stable Diffusion pipelines rewrite any
                           other value with a deprecation warning on every load)
    model_index.json       a full pipeline when the source teacher is a diffusers pipeline folder: its other
                           components (VAE, text encoders, tokenizers) are copied. SD1.5 form ->
                           StableDiffusionPipeline, SDXL form -> StableDiffusionXLPipeline (call them with
                           guidance_scale=1: the student samples without CFG; diffusers' LCM pipeline needs a
                           guidance-embedding UNet), pixel -> DDPMPipeline; always num_inference_steps=K
    unet_lora/             LoRA students: the adapter alone (peft format, adapter_config.json)
    unidad_student.json    steps, timesteps, output type, checkpoint, EMA, how to call the pipeline
                           (``pipeline_call``) and in which precision (``call_precision``, below)

Precision: ``unidad-dist sample`` runs the student's UNet under bf16 autocast when the student trained with
``precision: bf16_autocast`` (the default) and reads its output in fp32; the text encoders, VAE and scheduler
run outside autocast. The pipeline reproduces its images (to 1e-5) when loaded without ``torch_dtype`` (the
UNet is stored in fp32) and called with only the UNet under bf16 autocast, its output cast back to float32
(``call_precision`` holds the lines), on the device type ``sample`` ran on. Called plainly in fp32, or with
the whole call under autocast (which also casts the text encoders and VAE, and hands the scheduler a bf16
output), it does not (3e-3 to 0.4 apart on the test models). Other students sample in fp32: call plainly.

Students trained with an explicit ``student.timesteps`` list need ``timesteps=[...]`` in the pipeline call
(text pipelines accept it); the list is in unidad_student.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.core.io import staging_dir
from unidad_dist.errors import UserError
from unidad_dist.models.backbones import build_unet, resolve_backbone
from unidad_dist.train.loop import load_run

PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "pixel": "DDPMPipeline"}
TIMESTEP_SCALING = 1.0e7  # c_skip = σ_d² / ((t·s)² + σ_d²) ≈ 0 and c_out ≈ 1 to fp32 precision for t >= 1


def lcm_scheduler_config(schedule_config: dict, output: str, T: int) -> dict:
    from diffusers import LCMScheduler

    base = {k: v for k, v in schedule_config.items() if not k.startswith("_")}
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset",
            "rescale_betas_zero_snr", "timestep_spacing")
    cfg = {k: base[k] for k in keep if k in base}
    cfg.update(prediction_type=output, clip_sample=False, thresholding=False, set_alpha_to_one=True,
               original_inference_steps=T, timestep_scaling=TIMESTEP_SCALING,
               steps_offset=1)  # unused by LCMScheduler; any other value makes SD pipelines warn on each load
    return dict(LCMScheduler.from_config(cfg).config)


def ddim_scheduler_config(schedule_config: dict, output: str, clip_sample: Optional[float]) -> dict:
    """A DDIMScheduler that reproduces a method's DDIM sampler (methods.generate.ddim with "trailing" timesteps
    from T-1 and diffusers' step rule): eta = 0, the last step returning x̂0 (set_alpha_to_one), x̂0 clipped as
    the schedule clips it."""
    from diffusers import DDIMScheduler

    base = {k: v for k, v in schedule_config.items() if not k.startswith("_")}
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    cfg = {k: base[k] for k in keep if k in base}
    cfg.update(prediction_type=output, clip_sample=clip_sample is not None, clip_sample_range=clip_sample or 1.0,
               thresholding=False, set_alpha_to_one=True, timestep_spacing="trailing",
               steps_offset=1)  # unused by "trailing"; SD pipelines warn on any other value
    return dict(DDIMScheduler.from_config(cfg).config)


UNET_AUTOCAST_FORWARD = """\
unet_forward = pipe.unet.forward
def forward(*args, **kwargs):
    with torch.autocast(pipe.device.type, dtype=torch.bfloat16):
        out = unet_forward(*args, **kwargs)
    return (out[0].float(),) if isinstance(out, tuple) else type(out)(sample=out.sample.float())
pipe.unet.forward = forward
"""


def call_precision(student_precision: str) -> dict:
    """How to load and call the exported pipeline so that it gives the images of ``unidad-dist sample``:
    ``sample`` runs a ``bf16_autocast`` student's UNet under bf16 autocast and reads its output in fp32
    (everything else in fp32); any other student samples in fp32."""
    autocast = student_precision == "bf16_autocast"
    load = ("load without torch_dtype (the exported UNet is float32; the other components then load as "
            "`unidad-dist sample` loads them)")
    out = {"student_precision": student_precision, "torch_dtype": None,
           "unet_autocast": "bfloat16" if autocast else None, "unet_output_dtype": "float32"}
    if autocast:
        out["how"] = (f"{load}; run only the UNet under torch.autocast(<the pipeline's device type>, "
                      "dtype=torch.bfloat16) and cast its output to float32 (the text encoders, VAE and scheduler "
                      "outside autocast, as `sample` runs them), on the device type `sample` runs on: after "
                      "loading, run the lines in `code` (with `import torch` and the pipeline as `pipe`)")
        out["code"] = UNET_AUTOCAST_FORWARD
    else:
        out["how"] = f"{load} and call it without autocast"
    return out


def merged_unet_state(role_net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA student's UNet weights with the adapter merged in, under the plain UNet's keys."""
    from peft.tuners.lora import LoraLayer

    unet = role_net.unet
    for mod in unet.modules():
        if isinstance(mod, LoraLayer):
            mod.merge(safe_merge=True)
    out = {}
    for k, v in unet.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().cpu().clone()
    return out


def export(run: str, out: str, iteration: Optional[int] = None, use_ema: bool = True) -> Path:
    from diffusers import LCMScheduler

    out_p = Path(out)
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())):
        raise UserError(f"--out '{out}' exists and is not empty; choose a new folder")
    cfg, models, method, ckpt = load_run(run, use_ema=use_ema, iteration=iteration)
    role = method.sampler
    rc = getattr(cfg, role)
    spec = resolve_backbone(rc.backbone, role) if rc.backbone else models.spec
    info = method.sampling_info()
    with staging_dir(out_p) as tmp:  # published as --out when complete, removed (only it) on failure
        role_net = models.roles[role].module
        lora = rc.lora.rank > 0
        if lora:
            from peft import LoraConfig
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            (tmp / "unet_lora").mkdir()
            adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(role_net.unet).items()}
            save_file(adapter, str(tmp / "unet_lora" / "adapter_model.safetensors"))
            lc = rc.lora
            LoraConfig(r=lc.rank, lora_alpha=lc.alpha or lc.rank, lora_dropout=lc.dropout,
                       target_modules=list(lc.target_modules)).save_pretrained(str(tmp / "unet_lora"))
            state = merged_unet_state(role_net)
        else:
            state = {k: v.detach().cpu() for k, v in role_net.unet.state_dict().items()}
        unet = build_unet(spec)
        unet.load_state_dict(state)
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)

        T = int(models.schedule.alphas_cumprod.shape[0])
        output = info["output"]
        if info.get("scheduler", "lcm") == "ddim":  # a many-step sampler (e.g. a fine-tuned teacher)
            from diffusers import DDIMScheduler

            scheduler = "DDIMScheduler"
            DDIMScheduler.from_config(ddim_scheduler_config(models.spec.scheduler_config, output,
                                                            models.schedule.clip_sample)).save_pretrained(
                str(tmp / "scheduler"))
        else:
            scheduler = "LCMScheduler"
            LCMScheduler.from_config(lcm_scheduler_config(models.spec.scheduler_config, output, T)).save_pretrained(
                str(tmp / "scheduler"))
        default_ts = not info["explicit_timesteps"]
        pipeline = None
        src = models.spec
        if src.root is not None and (src.root / "model_index.json").is_file():
            index = json.loads((src.root / "model_index.json").read_text())
            trained_token = models.text is not None and models.text.token is not None
            written = set(models.text.component_names()) if trained_token else set()  # they carry the new token
            for name, ent in index.items():
                if name.startswith("_") or name in ("unet", "scheduler", *written) or not isinstance(ent, list) \
                        or ent[0] is None:
                    continue
                comp = src.root / name
                if comp.is_dir():
                    shutil.copytree(comp, tmp / name)
            if trained_token:
                models.text.save_components(tmp)
            # diffusers has no pipeline for a pixel-space UNet conditioned on CLIP text (the toy text teacher's
            # form): its folder keeps the source's components, and `unidad-dist sample` reads it
            pipeline = PIPELINE_CLASS[spec.kind] if spec.latent or spec.kind == "pixel" else None
            index["_class_name"] = pipeline or index.get("_class_name")
            index["unet"] = ["diffusers", type(unet).__name__]
            index["scheduler"] = ["diffusers", scheduler]
            if pipeline == "StableDiffusionPipeline":
                index.setdefault("safety_checker", [None, None])
                index.setdefault("feature_extractor", [None, None])
                index.setdefault("requires_safety_checker", False)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        K = info["steps"]
        call = {"num_inference_steps": K}
        if not default_ts:
            call["timesteps"] = list(info["timesteps"])
        if spec.kind != "pixel":
            call["guidance_scale"] = 1.0  # the student samples without CFG
        (tmp / "unidad_student.json").write_text(json.dumps({
            "checkpoint": ckpt.name,
            "steps": K,
            "timesteps": list(info["timesteps"]),
            "output": output,
            "ema": bool(models.specs[role].ema > 0 and use_ema),
            "lora": {"rank": rc.lora.rank, "adapter": "unet_lora", "merged_into": "unet"} if lora else None,
            "pipeline": pipeline,
            "pipeline_call": call,
            "call_precision": call_precision(rc.precision),
            "source_backbone": getattr(cfg, cfg.method.primary).backbone,
        }, indent=2))
    return out_p
