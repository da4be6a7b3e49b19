"""The `train` and `log` sections, and `RunConfig`: every section of a run, typed and validated.

`jaxlm.config` gives the same schema as an ml_collections ConfigDict (config files and
`--config.a.b=value` overrides) and builds a RunConfig from it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import ClassVar

from jaxlm import schema
from jaxlm.align.config import AlignConfig
from jaxlm.checkpoint import CheckpointConfig
from jaxlm.data.config import DataConfig
from jaxlm.errors import ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.parallel import ParallelConfig
from jaxlm.schema import field


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    steps: int = field(1000, "optimizer steps", ge=1)
    batch_size: int = field(8, "global batch size in rows of seq_len tokens (align: in pairs)", ge=1)
    grad_accum: int = field(1, "micro-batches per step (the batch is split, gradients summed)", ge=1)
    lr: float = field(3e-4, "peak learning rate", ge=0)
    schedule: str = field("cosine", "after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = field(100, "linear warmup from 0", ge=0)
    min_lr_ratio: float = field(0.1, "final learning rate as a fraction of lr (cosine, linear)", ge=0, le=1)
    weight_decay: float = field(0.1, "AdamW decoupled weight decay (not applied to norms)", ge=0)
    b1: float = field(0.9, "Adam beta1", ge=0, lt=1)
    b2: float = field(0.95, "Adam beta2", ge=0, lt=1)
    eps: float = field(1e-8, "Adam epsilon", gt=0)
    clip_norm: float = field(1.0, "global gradient-norm clip; 0 = off", ge=0)
    trainable: str = field("", "regex over parameter paths ('layers/attn/q'); only matches train. '' = all")
    loss_chunk: int = field(256, "sequence chunk of the memory-lean log-softmax (tokens); 0 = whole sequence", ge=0)
    seed: int = field(0, "seed of initialisation, shuffling and sampling", ge=0)
    eval_every: int = field(200, "evaluate every N steps (and at the end); 0 = only at the end", ge=0)
    eval_batches: int = field(20, "held-out batches per evaluation; 0 = the whole eval set", ge=0)

    def __post_init__(self):
        schema.check(self)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size {self.batch_size} is not divisible by train.grad_accum "
                              f"{self.grad_accum}")
        try:
            re.compile(self.trainable)
        except re.error as e:
            raise ConfigError(f"train.trainable {self.trainable!r} is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class LogConfig:
    SECTION: ClassVar[str] = "log"
    dir: str = field("runs/default", "run directory: metrics.jsonl, TensorBoard events, checkpoints")
    every: int = field(10, "log metrics every N steps", ge=1)
    tensorboard: bool = field(True, "write TensorBoard event files")
    progress: bool = field(True, "show a progress bar with ETA")
    peak_flops: float = field(0.0, "per-device peak FLOP/s for MFU; 0 = from the platform table (CPU: measured)",
                              ge=0)
    sample_prompt: str = field("", "after training, print a sample that continues this prompt ('' = none)")
    sample_tokens: int = field(64, "length of that sample in tokens", ge=1)

    def __post_init__(self):
        schema.check(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every section of a run. Sections validate themselves; this checks what spans sections."""

    SECTION: ClassVar[str] = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    align: AlignConfig = AlignConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    def __post_init__(self):
        d, t, m, pa = self.data, self.train, self.model, self.parallel
        if d.seq_len > m.max_position_embeddings:
            raise ConfigError(f"data.seq_len {d.seq_len} exceeds model.max_position_embeddings "
                              f"{m.max_position_embeddings}")
        if d.num_shards and t.batch_size % d.num_shards:
            raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by data.num_shards {d.num_shards}")
        if pa.tensor > 1:
            for name, n in (("num_kv_heads", m.num_kv_heads), ("num_heads", m.num_heads),
                            ("intermediate_size", m.intermediate_size), ("vocab_size", m.vocab_size)):
                if n % pa.tensor:
                    raise ConfigError(f"model.{name} {n} is not divisible by parallel.tensor {pa.tensor}")

    @classmethod
    def from_dict(cls, d: Mapping) -> RunConfig:
        """From a nested mapping or ml_collections ConfigDict (missing fields keep their defaults)."""
        if isinstance(d, RunConfig):
            return d
        return schema.from_dict(cls, d, "")

    def to_dict(self) -> dict:
        return schema.to_dict(self)

    def replace(self, **sections) -> RunConfig:
        return dataclasses.replace(self, **sections)

    @property
    def log_dir(self) -> str:
        return self.log.dir

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.log.dir.rstrip('/')}/checkpoints"
