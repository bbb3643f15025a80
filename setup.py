"""Install softadam_nlp. Exact versions for development live in requirements/constraints.txt."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("softadam_nlp/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="softadam-nlp",
    version=version["__version__"],
    description="SoftAdam (SGD/Adam blend) optimizer for fairseq and Hugging Face transformers",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["softadam_nlp", "softadam_nlp.*"]),
    # The fused CPU kernel's source, compiled on first use (softadam_nlp/_fused.py),
    # which needs ninja besides the system C++ compiler.
    package_data={"softadam_nlp": ["csrc/*.cpp"]},
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        # fairseq itself is installed separately (see the Makefile): its 0.12.2
        # release does not build on Python 3.11 and the fork that does must be
        # installed with --no-deps. These are its runtime needs.
        "fairseq": [
            "hydra-core",
            "omegaconf",
            "bitarray",
            "sacrebleu",
            "regex",
            "scikit-learn",
            "cython",
            "cffi",
            "packaging",
            "tqdm",
        ],
        "hf": [
            "transformers",
            "datasets",
            "tokenizers",
            "accelerate",
            "safetensors",
            "sacremoses",
            "subword-nmt",
            "sacrebleu",
        ],
        # DeepSpeed itself is installed separately with --no-deps (see the Makefile), so
        # that its torch requirement cannot pull another torch. These are its runtime needs.
        "deepspeed": [
            "einops",
            "hjson",
            "msgpack",
            "ninja",
            "numpy",
            "packaging",
            "psutil",
            "py-cpuinfo",
            "pydantic",
            "tqdm",
        ],
        "experiments": ["matplotlib", "numpy"],
        # triton: its interpreter runs the fused GPU kernels on CPU tensors in the suite
        # (CUDA builds of torch bring their own triton).
        "test": ["pytest", "hypothesis", "triton"],
        # The documentation site (mkdocs build), the packaging checks and the linter.
        "dev": ["mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff", "build", "twine"],
    },
)
