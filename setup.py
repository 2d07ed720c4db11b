import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """A wheel carries the shipped recipes as unidad_dist/recipes/ (an editable install reads recipes/)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "unidad_dist" / "recipes"
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(__file__).resolve().parent.glob("recipes/*.yaml")):
            shutil.copy(f, target / f.name)

setup(
    name="unidad_dist",
    version="0.1.0",
    description="Distributed Uni-DAD: few-step distillation and few-shot adaptation of diffusion models",
    long_description=Path(__file__).with_name("README.md").read_text() if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unidad_dist", "unidad_dist.*"]),
    # the pretrained built-in teachers (tools/build_demo_teacher.py), loaded as builtin:demo_teacher and
    # builtin:text_teacher
    package_data={"unidad_dist": [f"assets/{name}/{pattern}" for name in ("demo_teacher", "text_teacher")
                                  for pattern in ("*.json", "*.png", "*/*")]},
    # Ranges, so cluster users keep their own CUDA build of torch; CI pins exact versions in requirements-ci.txt.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "diffusers>=0.32",
        "transformers>=4.45",
        "peft>=0.13",
        "webdataset>=0.2.90",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "xxhash>=3.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "numpy>=1.26",
        "filelock>=3.12",
        "matplotlib>=3.7",
    ],
    extras_require={
        "ray": ["ray[default,train]>=2.40"],
        "slurm": ["submitit>=1.5"],
        "wandb": ["wandb>=0.18"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["unidad-dist=unidad_dist.cli:entry"]},
    cmdclass={"build_py": BuildPy},
)
