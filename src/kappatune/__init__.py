"""kappatune: fine-tune large language models on new data without forgetting what they already know.

Areas, one module each: :mod:`~kappatune.analysis` (spectra of weight tensors), :mod:`~kappatune.selection`
(which tensors to adapt), :mod:`~kappatune.methods` (KappaTune, LoRA, orthogonal subspace, EigenTune, CURLoRA,
baselines), :mod:`~kappatune.models`, :mod:`~kappatune.data`, :mod:`~kappatune.evaluation`,
:mod:`~kappatune.training`, :mod:`~kappatune.harness` (continual-learning runs and benchmarks) and the CLI.
"""

__version__ = "0.1.0"

from .errors import ConfigError, DataError, KappaTuneError, ModelError  # noqa: E402

__all__ = ["__version__", "KappaTuneError", "ConfigError", "DataError", "ModelError"]
