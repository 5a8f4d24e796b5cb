from setuptools import find_packages, setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description="ADM diffusion models with classifier guidance (Dhariwal & Nichol 2021) in PyTorch",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "blobfile", "tqdm", "pillow"],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "test": ["pytest", "mpi4py", "mpich"],
    },
)
