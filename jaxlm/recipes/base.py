"""The machinery every data recipe (POROver, WildFeedback, GPA, GenTool) shares: named stages over one
run directory, resumable and cached.

A recipe is a list of `Stage`s. Each stage reads the recipe config and the artefacts of the stages
before it, writes its own artefacts (JSON Lines, through `RecipeRun.write_jsonl`) and returns a small
summary (counts) that is recorded in RUN/state.json with a fingerprint of what it depended on:

    fingerprint(stage) = hash(the config sections the stage declares, the artefacts of earlier stages)

`Recipe.run` skips every stage whose recorded fingerprint still matches (so a re-run, or a run resumed
after a crash or Ctrl-C, starts at the first unfinished or changed stage) and `from_stage=NAME` redoes
NAME and everything after it. Teachers and judges are OpenAI-protocol endpoints reached through
`jaxlm.infer.client.ChatClient` with an on-disk cache in RUN/cache/ROLE, so a redone stage pays for no
request twice; an endpoint with no base_url is a local `jaxlm serve` of its checkpoint, started on a
free 127.0.0.1 port for the run and stopped after it (endpoints naming the same checkpoint share one).

A stage that starts again invalidates itself and every later stage in RUN/state.json before it runs,
so a crash in the middle never leaves a later stage marked done over artefacts it did not see. Long
work inside a stage (training) goes to `run.work_dir(NAME)`, which is kept for the stage to resume
when the same fingerprint made it, and emptied otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jaxlm.errors import ConfigError, DataError, JaxlmError

STATE = "state.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a recipe. `fn(run) -> summary dict`; `config` names the recipe-config sections the
    stage reads (its fingerprint), or is a function of the config giving them (for sections named by
    other sections, e.g. the endpoints of a list of teachers); `outputs` the artefact names it writes
    (checked to exist)."""

    name: str
    fn: Callable[[RecipeRun], dict]
    config: tuple[str, ...] | Callable[..., Sequence[str]] = ()
    outputs: tuple[str, ...] = ()
    help: str = ""


def _plain(node):
    if hasattr(node, "to_dict"):
        node = node.to_dict()
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in sorted(node.items())}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class BadRows:
    """Counts of rows a stage could not use, by kind, with the first few origins; `check` stops the
    run once more than `max_fraction` of `total` rows are bad."""

    def __init__(self, what: str, max_fraction: float, field: str = "max_bad_fraction"):
        self.what, self.max_fraction, self.field = what, max_fraction, field
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, origin: str = "", n: int = 1):
        self.counts[kind] += n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3 and origin:
            ex.append(origin)

    def add_report(self, report):
        """Fold in a `jaxlm.data.sources.Report` (rows the reader itself could not parse)."""
        for kind, n in report.bad.items():
            self.counts[kind] += n
            ex = self.examples.setdefault(kind, [])
            ex.extend(report.examples.get(kind, [])[:3 - len(ex)])

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {"bad": dict(self.counts), "bad_examples": {k: v for k, v in self.examples.items() if v}}

    def check(self, total: int):
        bad = sum(self.counts.values())
        if total and bad / total > self.max_fraction:
            detail = "; ".join(f"{k}: {n} (e.g. {', '.join(self.examples.get(k, [])) or '-'})"
                               for k, n in self.counts.most_common())
            raise DataError(f"{self.what}: {bad} of {total} rows are bad ({bad / total:.0%}), more than "
                            f"{self.field}={self.max_fraction:.0%}: {detail}",
                            hint=f"fix the input, or allow more with --config.{self.field}" if "." in self.field else "")


class RecipeRun:
    """A recipe's run directory and what its stages use: the config, artefacts, clients, progress."""

    def __init__(self, recipe: Recipe, cfg, directory, console: Console | None = None):
        self.recipe, self.cfg = recipe, cfg
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._clients: dict = {}
        self._local: dict = {}  # (checkpoint, slots, max_len) -> base_url of its local server
        self._servers = contextlib.ExitStack()
        self.stage: str = ""
        self.fingerprint: str = ""  # of the running stage

    # -- artefacts ---------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / name

    def write_jsonl(self, name: str, rows: Iterable[dict]) -> Path:
        """Write rows atomically (a crash leaves the old file or none, never half a file)."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        n = 0
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
        os.replace(tmp, path)
        return path

    def read_jsonl(self, name: str) -> list[dict]:
        path = self.path(name)
        if not path.exists():
            raise JaxlmError(f"{path} is missing: stage {self.recipe.producer(name)!r} has not run",
                             hint=f"run the recipe from that stage: --from-stage {self.recipe.producer(name)}")
        return [json.loads(line) for line in open(path) if line.strip()]

    def write_json(self, name: str, obj) -> Path:
        path = self.path(name)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
        return path

    # -- progress ----------------------------------------------------------------------------
    def progress(self, items: Sequence, what: str):
        """Iterate `items` with a progress bar (on terminals; a start line otherwise)."""
        if not self.console.is_terminal:
            self.console.print(f"[dim]{escape(self.stage)}[/dim] {escape(what)}: {len(items)}")
            yield from items
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"[bold]{escape(self.stage)}[/bold] {escape(what)}"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=self.console, transient=True) as bar:
            task = bar.add_task(what, total=len(items))
            for item in items:
                yield item
                bar.advance(task)

    def work_dir(self, name: str) -> Path:
        """RUN/NAME for the long work of the running stage (checkpoints): kept when the same stage
        fingerprint made it (a crashed stage resumes there), emptied when it is left from other
        settings or upstream artefacts."""
        d = self.path(name)
        mark = d / ".fingerprint"
        if d.exists() and not (mark.exists() and mark.read_text() == self.fingerprint):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        mark.write_text(self.fingerprint)
        return d

    # -- teachers and judges -----------------------------------------------------------------
    def endpoint(self, role: str):
        """The endpoint section `role` of the recipe config (base_url, model, checkpoint, api_key_env,
        concurrency, retries, timeout, slots, max_len)."""
        if role not in self.cfg:
            raise ConfigError(f"recipe.{role}: no such endpoint section")
        return self.cfg[role]

    def client(self, role: str):
        """The ChatClient of endpoint section `role` (teacher, judge, ...), cached in RUN/cache/ROLE.
        With no base_url, a local `jaxlm serve` of its checkpoint (one server per checkpoint, shared by
        the roles that name it); its model id is the checkpoint, so the cache tells checkpoints apart."""
        if role in self._clients:
            return self._clients[role]
        from jaxlm.infer.client import ChatClient

        ep = self.endpoint(role)
        base_url, model = ep.get("base_url", ""), ep.get("model", "") or None
        if not base_url:
            checkpoint = ep.get("checkpoint", "")
            if not checkpoint:
                raise ConfigError(f"recipe.{role}: give base_url (an OpenAI-protocol server) or checkpoint "
                                  "(a model to serve locally)")
            key = (checkpoint, ep.get("slots", 8), ep.get("max_len", 2048))
            if key not in self._local:
                self._local[key] = self._servers.enter_context(LocalServer(
                    checkpoint, self.dir / "logs" / f"serve-{role}.log", self.console, slots=key[1],
                    max_len=key[2]))
            base_url, model = self._local[key], model or checkpoint
        elif not model:
            raise ConfigError(f"recipe.{role}.model: name the model the server at {base_url} serves")
        key = os.environ.get(ep.get("api_key_env", "OPENAI_API_KEY") or "OPENAI_API_KEY")
        client = ChatClient(base_url, api_key=key, model=model, concurrency=ep.get("concurrency", 4),
                            retries=ep.get("retries", 5), timeout=ep.get("timeout", 300.0),
                            cache_dir=self.dir / "cache" / role, progress=False)
        self._clients[role] = client
        return client

    def ask(self, role: str, requests: Sequence[tuple[list, dict]], what: str) -> list:
        """Chat completions of (messages, params) requests to endpoint `role`, at most its concurrency
        in flight, with a progress bar: one ChatResult per request, in order, or the JaxlmError that
        request ended with (a refused request or one that failed after every retry). The caller counts
        the failures (`BadRows`); one bad request never stops the others."""
        import asyncio

        client = self.client(role)
        results: list = [None] * len(requests)
        bar = _Bar(self, what, len(requests))

        async def one(i, messages, params):
            try:
                results[i] = await client.achat(list(messages), **dict(params))
            except JaxlmError as e:
                results[i] = e
            bar.advance()

        async def main():
            await asyncio.gather(*(one(i, m, p) for i, (m, p) in enumerate(requests)))

        try:
            asyncio.run(main())
        finally:
            bar.close()
        return results

    def completer(self, role: str, **params):
        """A `complete(messages) -> str` with `many(conversations)` over endpoint `role` (what the judges
        of jaxlm.eval.judges take); a failed request answers '' and is counted in `.failures`."""
        return _Completer(self, role, params)

    def close(self):
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._local.clear()
        self._servers.close()


class _Bar:
    """A progress bar advanced from callbacks (rich on terminals; a start line otherwise)."""

    def __init__(self, run: RecipeRun, what: str, total: int):
        self.progress = None
        if not run.console.is_terminal:
            run.console.print(f"[dim]{escape(run.stage)}[/dim] {escape(what)}: {total}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{escape(run.stage)}[/bold] {escape(what)}"), BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=run.console, transient=True)
        self.task = self.progress.add_task(what, total=total)
        self.progress.start()

    def advance(self):
        if self.progress is not None:
            self.progress.advance(self.task)

    def close(self):
        if self.progress is not None:
            self.progress.stop()


class _Completer:
    def __init__(self, run: RecipeRun, role: str, params: dict):
        self.run, self.role, self.params = run, role, params
        self.failures: list[str] = []

    def many(self, conversations, progress=None) -> list[str]:
        out = []
        for r in self.run.ask(self.role, [(c, self.params) for c in conversations], f"asking {self.role}"):
            if isinstance(r, Exception):
                self.failures.append(str(r))
                out.append("")
            else:
                out.append(r.text or "")
        return out

    def __call__(self, messages, **params) -> str:
        return self.many([messages])[0]

    def choice_alternatives(self, conversations, progress=None) -> list:
        """The first reply token's top alternatives per conversation (judge_pairwise's verdict='logprobs');
        None for a failed request (counted in `.failures`) or a server that gives no log-probabilities."""
        from jaxlm.eval.judges import LETTER_REQUEST, first_token_alternatives

        out = []
        for r in self.run.ask(self.role, [(c, LETTER_REQUEST) for c in conversations], f"asking {self.role} (log-probs)"):
            if isinstance(r, Exception):
                self.failures.append(str(r))
                out.append(None)
            else:
                out.append(first_token_alternatives(r.response))
        return out


class LocalServer:
    """`jaxlm serve CHECKPOINT` on a free 127.0.0.1 port for the length of a `with` block."""

    def __init__(self, checkpoint: str, log: Path, console: Console, timeout: float = 600, slots: int = 8,
                 max_len: int = 2048):
        self.checkpoint, self.log, self.console, self.timeout = checkpoint, Path(log), console, timeout
        self.slots, self.max_len = slots, max_len
        self.proc = None

    def __enter__(self) -> str:
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.console.print(f"[dim]starting a local server of {escape(self.checkpoint)} on 127.0.0.1:{port} "
                           f"(log {escape(str(self.log))})[/dim]")
        self._out = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "serve", "--checkpoint", self.checkpoint,
                                      "--port", str(port), "--model-name", self.checkpoint,
                                      "--slots", str(self.slots), "--max-len", str(self.max_len)],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
        end = time.time() + self.timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                self._out.close()
                tail = self.log.read_text()[-1500:]
                raise JaxlmError(f"the local server of {self.checkpoint} exited ({self.proc.returncode}): {tail}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise JaxlmError(f"the local server of {self.checkpoint} did not answer within {self.timeout:.0f}s")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_out", None):
            self._out.close()


class Recipe:
    """A named list of stages with presets (named config overrides, e.g. `mini`)."""

    def __init__(self, name: str, stages: Sequence[Stage], presets: dict[str, dict] | None = None, doc: str = ""):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {name}: duplicate stage names {names}")
        self.name, self.stages, self.presets, self.doc = name, list(stages), dict(presets or {}), doc

    def producer(self, artefact: str) -> str:
        return next((s.name for s in self.stages if artefact in s.outputs), "?")

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def _fingerprint(self, stage: Stage, cfg, upstream: list[str]) -> str:
        names = stage.config(cfg) if callable(stage.config) else stage.config
        sections = {k: cfg.get(k) for k in names}
        return _hash({"stage": stage.name, "config": sections, "upstream": upstream})

    def run(self, cfg, directory, *, from_stage: str | None = None, until: str | None = None,
            console: Console | None = None) -> dict:
        """Run the stages that are not done (or changed), in order; returns {stage: summary}."""
        names = self.stage_names()
        for which, stage_name in (("--from-stage", from_stage), ("--until", until)):
            if stage_name and stage_name not in names:
                raise ConfigError(f"{which} {stage_name!r}: recipe {self.name} has the stages {', '.join(names)}")
        run = RecipeRun(self, cfg, directory, console)
        state_path = run.path(STATE)
        state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
        redo = False
        upstream: list[str] = []
        summaries = {}
        try:
            for stage in self.stages:
                redo = redo or stage.name == from_stage
                fp = self._fingerprint(stage, cfg, upstream)
                done = state["stages"].get(stage.name)
                outputs_ok = all(run.path(o).exists() for o in stage.outputs)
                if done and not redo and done.get("fingerprint") == fp and outputs_ok:
                    run.console.print(f"[dim]{stage.name}: done, skipped[/dim]")
                    summaries[stage.name] = done.get("summary", {})
                else:
                    redo = True  # every later stage depends on this one's artefacts
                    later = names[names.index(stage.name):]
                    if any(n in state["stages"] for n in later):  # not done until it finishes again
                        state["stages"] = {k: v for k, v in state["stages"].items() if k not in later}
                        run.write_json(STATE, state)
                    run.stage, run.fingerprint = stage.name, fp
                    run.console.print(f"[bold]{stage.name}[/bold]" + (f" — {stage.help}" if stage.help else ""))
                    t0 = time.perf_counter()
                    summary = stage.fn(run) or {}
                    missing = [o for o in stage.outputs if not run.path(o).exists()]
                    if missing:
                        raise RuntimeError(f"stage {stage.name} did not write {missing}")
                    state["stages"][stage.name] = {
                        "fingerprint": fp, "summary": summary, "seconds": round(time.perf_counter() - t0, 2),
                        "outputs": {o: file_hash(run.path(o)) for o in stage.outputs if run.path(o).is_file()}}
                    run.write_json(STATE, state)
                    summaries[stage.name] = summary
                    line = ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, int | float | str))
                    run.console.print(f"[green]{stage.name} done[/green]" + (f": {escape(line)}" if line else ""))
                upstream.append(json.dumps(state["stages"][stage.name].get("outputs", {}), sort_keys=True))
                if stage.name == until:
                    break
        finally:
            run.close()
        return summaries
