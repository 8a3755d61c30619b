"""fedprompt: federated soft-prompt tuning and the personalization/robustness trade-off."""

import pathlib

import setuptools

setuptools.setup(
    name="fedprompt",
    version="0.1.0",
    description=(
        "TFF + keras-nlp library and benchmark for federated soft-prompt tuning "
        "and the personalization vs robustness trade-off (Profit, Collins et al. 2023)."
    ),
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["fedprompt*", "tasks*", "optimizers*"]),
    py_modules=["run_experiment"],
    python_requires=">=3.9,<3.12",
    # Exact versions live in requirements/lock.txt (installed by `make install`,
    # in the order TFF 0.87 needs); these are the direct requirements.
    install_requires=[
        "tensorflow==2.14.*",
        "tensorflow-federated==0.87.0",
        "keras-nlp==0.12.1",
        "tensorflow-text==2.14.*",
        "tensorflow-datasets==4.9.3",
        "rouge-score==0.1.2",
        "gguf==0.19.0",
        "absl-py",
        "numpy",
        "matplotlib",
        "psutil",
    ],
    entry_points={"console_scripts": ["fedprompt-generate=fedprompt.generate:run"]},
)
