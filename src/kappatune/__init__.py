"""kappatune: fine-tune large language models on new data without forgetting what they already know.

Areas, one module each: :mod:`~kappatune.analysis` (spectra of weight tensors), :mod:`~kappatune.selection`
(which tensors to adapt), :mod:`~kappatune.methods` (KappaTune, LoRA, orthogonal subspace, EigenTune, CURLoRA,
baselines), :mod:`~kappatune.models`, :mod:`~kappatune.data`, :mod:`~kappatune.evaluation`,
:mod:`~kappatune.training`, :mod:`~kappatune.harness` (continual-learning runs and benchmarks),
:mod:`~kappatune.finetune` (``kappatune.train``: fine-tune on your data, get a loadable model) and the CLI.
Library messages go through the ``kappatune`` :mod:`logging` logger (the CLI shows INFO; ``-q`` only warnings).
"""

__version__ = "0.1.0"

from .errors import ConfigError, DataError, KappaTuneError, ModelError  # noqa: E402

__all__ = ["__version__", "KappaTuneError", "ConfigError", "DataError", "ModelError", "train"]


def __getattr__(name: str):  # ``kappatune.train`` without importing torch on ``import kappatune``
    if name == "train":
        from .finetune import train

        return train
    raise AttributeError(f"module 'kappatune' has no attribute {name!r}")
