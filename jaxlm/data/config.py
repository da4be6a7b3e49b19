"""The `data` section of the run config."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxlm import schema
from jaxlm.schema import field


@dataclasses.dataclass(frozen=True)
class DataConfig:
    SECTION: ClassVar[str] = "data"
    tokenizer: str = field("", "tokenizer: a tokenizer.json, a .tiktoken file, PRESET:path (phi4, o200k_base, gpt2), "
                               "gguf:PATH, asset:NAME")
    train: str = field("", "training sources: 'PATH[@WEIGHT], ...'; PATH may be a glob, .jsonl[.gz], .parquet, "
                           "arrayrecord:PATH, tfds:NAME[/CONFIG]:SPLIT, asset:NAME")
    eval: str = field("", "held-out sources (same syntax); '' for none")
    text_field: str = field("text", "record field holding plain text")
    messages_field: str = field("messages", "record field holding chat messages (the model's chat template, "
                                            "assistant-only loss)")
    prompt_field: str = field("", "record field of a prompt put before the text with no loss (SFT on "
                                  "prompt/completion pairs: text_field is the completion)")
    group_field: str = field("", "record field to report eval perplexity by (for example 'family')")
    seq_len: int = field(256, "tokens per packed row", ge=2)
    long_records: str = field("split", "records longer than seq_len", choices=("split", "truncate"))
    add_eos: bool = field(True, "append the end-of-text token to every document")
    packing_bins: int = field(8, "open rows the first-fit packer fills before emitting", ge=1)
    num_shards: int = field(0, "independent input streams; 0 = one per process. Fix it to make batches "
                               "independent of the process count", ge=0)
    max_bad_fraction: float = field(0.01, "stop when more than this fraction of a source's records is bad", ge=0, le=1)
    prefetch: int = field(2, "batches prefetched by a background thread (bounded); 0 = off", ge=0)
    num_workers: int = field(0, "grain worker processes for tokenizing and packing; 0 = in the main process", ge=0)

    def __post_init__(self):
        schema.check(self)
