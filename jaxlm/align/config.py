"""The `align` section of the run config: the preference loss and where its reference comes from."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlm import schema
from jaxlm.align.losses import NAMES, REFERENCE_FREE
from jaxlm.errors import ConfigError
from jaxlm.schema import field

REFERENCES = ("precomputed", "checkpoint", "adapters_off", "none")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    SECTION: ClassVar[str] = "align"
    loss: str = field("dpo", "preference loss (jaxlm.align.losses.NAMES)", choices=NAMES)
    beta: float = field(0.1, "inverse temperature of the implicit reward (appears once in every loss)", gt=0)
    label_smoothing: float = field(0.0, "flip rate eps (conservative DPO, robust, exo_pair)", ge=0, lt=0.5)
    gamma: float = field(0.0, "SimPO's target reward margin (raw, not gamma/beta)", ge=0)
    sft_weight: float = field(0.0, "RPO: weight of the chosen response's per-token NLL added to the loss", ge=0)
    reference: str = field("precomputed", "reference log-probs: precomputed (cached pass) | checkpoint (in-step) | "
                                          "adapters_off (LoRA policy without adapters) | none (reference-free)",
                           choices=REFERENCES)
    reference_checkpoint: str = field("", "reference model ('' = the --init checkpoint, else the initial params)")
    ref_cache_dir: str = field("", "cache of precomputed reference log-probs ('' = next to the data if writable, "
                                   "else LOG_DIR/reference)")
    max_prompt_length: int = field(128, "prompt tokens kept (its end) when prompt + response exceed data.seq_len",
                                   ge=1)
    prompt_field: str = field("prompt", "record field of the prompt (string or messages)")
    chosen_field: str = field("chosen", "record field of the preferred response")
    rejected_field: str = field("rejected", "record field of the dispreferred response")

    def __post_init__(self):
        schema.check(self)
        if self.reference == "none" and self.loss not in REFERENCE_FREE:
            raise ConfigError(f"align.reference=none needs a reference-free loss "
                              f"({', '.join(sorted(REFERENCE_FREE))}), not {self.loss}")

    def loss_kwargs(self) -> dict:
        """The hyperparameters `preference_loss` takes for this loss (zeros left out)."""
        kw = {"beta": self.beta}
        for k in ("label_smoothing", "gamma", "sft_weight"):
            if getattr(self, k):
                kw[k] = getattr(self, k)
        return kw
