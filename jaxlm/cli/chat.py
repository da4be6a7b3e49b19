"""`jaxlm chat`: a terminal chat with a checkpoint or a named model, streaming tokens as they come.

    jaxlm chat --checkpoint smollm2-135m-instruct
    jaxlm chat --checkpoint smollm2-135m-instruct --prompt "What is the capital of France?"

The conversation is kept and rendered with the model's own chat template every turn; /reset forgets
it, /system TEXT sets the system message (and resets), /exit (or end of input) leaves.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from rich.markup import escape

from jaxlm import models
from jaxlm.checkpoint import model_from_checkpoint
from jaxlm.cli.common import add_sampling_args, console
from jaxlm.data.tokenizer import Tokenizer, apply_chat_template, load_tokenizer
from jaxlm.errors import UsageError
from jaxlm.infer.generate import Generator, Sampling, bucket, left_pad, sample_logits
from jaxlm.model import ModelConfig
from jaxlm.recipes.gpa_rubric import system_from_args

HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit leaves"


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text, description=f"{help_text}. {HELP}.")
    p.add_argument("--checkpoint", metavar="NAME|CKPT", default=models.DEFAULT_MODEL,
                   help=f"a pulled model name or an Orbax checkpoint (default {models.DEFAULT_MODEL})")
    p.add_argument("--prompt", help="ask this once, print the reply and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--rubric", metavar="FILE", help="GPA rubrics (rubrics.json of `jaxlm recipe gpa`): with --group, "
                   "the group's rubric goes into the system message (GPA-CT)")
    p.add_argument("--group", help="the user group whose rubric --rubric applies")
    p.add_argument("--intent", help="only the rubric of this intent (default: every intent of the group)")
    p.add_argument("--tokenizer", help="override the checkpoint's tokenizer")
    add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)


class ChatSession:
    """A conversation with one model: each turn renders the whole chat, prefills it and decodes
    token by token with the Generator's jitted steps (the KV cache is donated, not copied)."""

    def __init__(self, config: ModelConfig, params, tok: Tokenizer, sampling: Sampling, max_new_tokens: int,
                 system: str | None = None, seed: int = 0):
        self.config, self.params, self.tok, self.sampling = config, params, tok, sampling
        self.max_new_tokens, self.seed, self.turn = max_new_tokens, seed, 0
        self.gen = Generator(config, sampling)
        self.step = jax.jit(self.gen._step_impl, donate_argnums=(1,))
        self.sample = jax.jit(sample_logits, static_argnums=2)
        self.stops = set(tok.stop_ids)
        self.system = system
        self.messages: list[dict] = []

    def reset(self, system: str | None = None):
        self.messages = []
        if system is not None:
            self.system = system or None

    def _prompt_ids(self, user: str) -> list[int]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        limit = self.config.max_position_embeddings - 1
        while True:
            msgs = sys_msg + self.messages + [{"role": "user", "content": user}]
            ids, _ = apply_chat_template(self.tok, msgs, add_generation_prompt=True)
            if len(ids) <= limit or not self.messages:
                break
            self.messages = self.messages[2:]  # forget the oldest exchange
            console.print("[dim](the conversation outgrew the context: the oldest turn is forgotten)[/dim]")
        if len(ids) > limit:
            raise UsageError(f"the message is {len(ids)} tokens, more than the model's context of "
                             f"{self.config.max_position_embeddings}")
        return ids

    def ask(self, user: str, emit=None) -> str:
        """The model's reply to `user` (streamed through emit(text_piece)); the turn is kept."""
        emit = emit or (lambda s: None)
        ids = self._prompt_ids(user)
        max_new = min(self.max_new_tokens, self.config.max_position_embeddings - len(ids))
        p_len = bucket(len(ids))
        tokens, seg, pos = left_pad([ids], p_len, self.tok.pad_id if self.tok.pad_id >= 0 else 0)
        cache = self.gen.new_cache(1, bucket(p_len + max_new, 256))
        logits, cache = self.gen.prefill(self.params, tokens, seg, pos, cache)
        rng = jax.random.key(self.seed + self.turn)
        self.turn += 1
        out, shown, position = [], "", len(ids)
        try:
            for _ in range(max_new):
                rng, sub = jax.random.split(rng)
                t = int(self.sample(logits, sub, self.sampling)[0])
                if t in self.stops:
                    break
                out.append(t)
                text = self.tok.decode(out)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    emit(text[len(shown):])
                    shown = text
                logits, cache = self.step(self.params, cache, jnp.asarray([t], jnp.int32),
                                          jnp.asarray([position], jnp.int32))
                position += 1
        except KeyboardInterrupt:
            emit(" [interrupted]")
        reply = self.tok.decode(out)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return reply


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_chat(args, overrides):
    if overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)}")
    model_cfg, params, spec = model_from_checkpoint(args.checkpoint)
    spec = args.tokenizer or spec
    if not spec:
        raise UsageError("the checkpoint has no tokenizer: pass --tokenizer")
    tok = load_tokenizer(spec)
    if not tok.chat_template:
        raise UsageError("the tokenizer has no chat template, so this model cannot chat",
                         hint="jaxlm generate samples plain continuations")
    system = system_from_args(args.rubric, args.group, args.intent, args.system)
    session = ChatSession(model_cfg, params, tok, Sampling(args.temperature, args.top_k, args.top_p),
                          args.max_new_tokens, system, args.seed)
    if args.prompt is not None:
        session.ask(args.prompt, _write)
        _write("\n")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"chatting with {escape(str(args.checkpoint))} ({model_cfg.num_params / 1e6:.0f}M parameters). "
                      f"{HELP}.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            console.print("[dim](conversation forgotten)[/dim]")
            continue
        if text == "/system" or text.startswith("/system "):
            session.reset(text[len("/system"):].strip())
            console.print(f"[dim](system message {'set' if session.system else 'cleared'}; conversation forgotten)"
                          f"[/dim]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]unknown command {escape(text.split()[0])}[/yellow]: {HELP}")
            continue
        session.ask(line, _write)
        _write("\n")
    return 0
