"""Which tensors to adapt: κ (KappaTune), SNR (Spectrum), random and all, under a budget.

(Being implemented; the public contract below is stable.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Selection:
    """The result of a selection policy.

    ``module_names``: modules whose 2-D weight was selected (usable as PEFT ``target_modules``).
    ``parameter_names``: every selected parameter (``<module>.weight`` and fused MoE 3-D parameters).
    ``moe_parameter_names``: the fused 3-D expert parameters among them (PEFT ``target_parameters``).
    ``num_params``: number of weights the selection makes trainable under full fine-tuning.
    ``scores``: the policy's score per selected tensor name (κ, SNR, ...), in selection order.
    """

    policy: str
    module_names: list[str]
    parameter_names: list[str]
    moe_parameter_names: list[str] = field(default_factory=list)
    num_params: int = 0
    scores: dict[str, float] = field(default_factory=dict)
