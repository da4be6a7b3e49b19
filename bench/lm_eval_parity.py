"""jaxlm's benchmarks against lm-evaluation-harness itself: the same rows, the numbers side by side.

    python bench/lm_eval_parity.py --checkpoint CKPT [--hf-dir DIR] [--limit 500] [--tasks ...]
    python bench/lm_eval_parity.py --write-golden          # regenerate tests/golden/lm_eval/

1. exports the checkpoint to a Hugging Face folder (`jaxlm convert --to-hf`) unless --hf-dir is given;
2. runs the harness (`lm_eval --model hf`, float32, on CPU) on local task YAMLs that `include` the
   harness's own hellaswag / arc / piqa / lambada_openai YAMLs and only point them at the jsonl files
   (the validation split; few-shot examples, if any, from the same file without the evaluated row);
3. runs `jaxlm eval --task ...` on the same rows (the first --limit rows; all of arc_challenge);
4. prints accuracies side by side, the rows where the two predictions differ (with both models'
   log-likelihoods, so a near-tie is visible), and each side's wall time.

Each side runs in its own subprocess (so neither warms the other's caches), one after the other,
with the same thread count.

The harness helpers below (`write_task_yamls`, `harness_requests`) are also what the tests and the
golden-file writer use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("JAXLM_SHARED", ROOT.parent / "shared")) / "data"
# jaxlm task -> (the harness's task YAML, relative to lm_eval/tasks)
HARNESS_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "lambada": "lambada/lambada_openai.yaml",
}
PREFIX = "jaxlm_"  # local task names: jaxlm_hellaswag, ...


def write_task_yamls(folder: Path, files: dict[str, str]) -> list[str]:
    """Task YAMLs in `folder`, one per jaxlm task in `files` (task -> jsonl path), each including the
    harness's own YAML and overriding only where the rows come from. Returns the harness task names."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task, path in files.items():
        name = PREFIX + task
        (folder / f"{name}.yaml").write_text("\n".join([
            f"include: {tasks_dir / HARNESS_YAML[task]}",
            f"task: {name}",
            "tag: jaxlm_parity",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {json.dumps(str(Path(path).resolve()))}",
            "training_split: null",
            "validation_split: validation",
            "test_split: null",
            "",
        ]))
        names.append(name)
    return names


def harness_task(task: str, path: str, num_fewshot: int = 0, seed: int = 1234):
    """The harness's ConfigurableTask for a jaxlm task over `path`, set up as simple_evaluate sets it."""
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="jaxlm_lm_eval_"))
    (name,) = write_task_yamls(folder, {task: path})
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    obj = tm.load([name])["tasks"][name] if hasattr(tm, "load") else tm.load_task_or_group([name])[name]
    obj.set_config(key="num_fewshot", value=num_fewshot)
    obj.set_fewshot_seed(seed=seed)
    return obj


def harness_requests(task: str, path: str, *, limit: int | None = None, num_fewshot: int = 0,
                     seed: int = 1234) -> list[dict]:
    """Per evaluated row, what the harness's own code asks the model: {doc_id, arguments: [(context,
    continuation), ...], target}."""
    obj = harness_task(task, path, num_fewshot, seed)
    obj.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in obj.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        out.append({"doc_id": doc_id, "arguments": [list(i.args) for i in insts],
                    "target": obj.doc_to_target(insts[0].doc)})
    return out


def harness_evaluate(hf_dir: str, files: dict[str, str], *, limit: int | None = None, num_fewshot: int = 0,
                     batch_size: int | str = 16, bootstrap_iters: int = 100_000, log_samples: bool = True):
    """lm_eval.simple_evaluate with `--model hf` (float32, CPU) on jaxlm tasks over `files`; returns
    the harness's output dict (results, samples, ...), keyed by jaxlm task names."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="jaxlm_lm_eval_"))
    names = write_task_yamls(folder, files)
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=batch_size)
    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # the same bootstrap draws, without forking a JAX process
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(
            include_path=str(folder), include_defaults=False), num_fewshot=num_fewshot, limit=limit,
            bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    finally:
        if saved is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = saved
    for key in ("results", "samples", "n-samples", "configs"):
        if key in res:
            res[key] = {k.removeprefix(PREFIX): v for k, v in res[key].items()}
    return res


def encode_pairs_with_harness(hf_dir: str, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """The harness's HFLM._encode_pair on each (context, continuation), with the folder's tokenizer."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)
    return [tuple(map(list, lm._encode_pair(c, x))) for c, x in pairs]


# ----------------------------------------------------------------------------- golden files
GOLDEN = ROOT / "tests" / "golden" / "lm_eval"
# pairs whose split is subtle: trailing context whitespace (moved into the continuation) and tokens
# that merge across the boundary (the continuation is what follows the context's own encoding)
EXTRA_PAIRS = [("Hello world ", "foo"), ("Question: x\nAnswer:  ", " bar"), ("line one\n", "line two"),
               ("The cat sat on the mat", "s"), ("I don", "'t know"), ("tab\t", " x"), ("café ", "crème")]
GOLDEN_ROWS = {"hellaswag": "hellaswag.jsonl", "arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_easy.jsonl",
               "piqa": "piqa.jsonl", "lambada": "lambada.jsonl"}


def tiny_hf_folder(folder: Path) -> Path:
    """A tiny random transformers model with jaxlm's tiny BPE tokenizer (for the harness's tokenizer
    path: HFLM needs a model to exist)."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from jaxlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer("asset:tiny_bpe.json")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                  pad_token_id=0, bos_token_id=None, eos_token_id=1)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_hf(folder)
    return folder


def write_golden():
    """tests/golden/lm_eval/requests.json from the harness's own code on the fixture rows: each task's
    (context, continuation) pairs and targets at 0 and 2 shots, and the harness's token split of every
    pair with jaxlm's tiny BPE tokenizer."""
    import lm_eval

    out = {"lm_eval_version": lm_eval.__version__, "tokenizer": "asset:tiny_bpe.json", "tasks": {}}
    pairs = []
    for task, rows in GOLDEN_ROWS.items():
        out["tasks"][task] = {}
        for k in (0, 2):
            reqs = harness_requests(task, str(GOLDEN / "rows" / rows), num_fewshot=k)
            out["tasks"][task][str(k)] = reqs
            pairs += [tuple(a) for r in reqs for a in r["arguments"]]
    pairs = sorted(set(pairs) | set(EXTRA_PAIRS))
    with tempfile.TemporaryDirectory() as d:
        enc = encode_pairs_with_harness(str(tiny_hf_folder(Path(d))), pairs)
    out["encodings"] = [[c, x, ci, xi] for (c, x), (ci, xi) in zip(pairs, enc)]
    (GOLDEN / "requests.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN / 'requests.json'}: {len(pairs)} pairs")


# ----------------------------------------------------------------------------- the parity run
def _run(cmd, log: Path, env=None) -> tuple[float, float]:
    """Run cmd (output to log); its (wall, CPU) seconds. CPU time (user + system of the process and
    its children) is less sensitive than wall time to other work on a shared machine."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _run_together(jobs: dict) -> dict:
    """Run the jobs {name: (cmd, log, env)} at the same time; {name: (wall, CPU) seconds}, the CPU time
    of each process tree read from its own rusage (os.wait4), so the two do not mix."""
    procs, t0, out = {}, time.perf_counter(), {}
    for name, (cmd, log, env) in jobs.items():
        f = open(log, "w")
        procs[subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).pid] = (
            name, cmd, log, f)
    while procs:
        pid, status, ru = os.wait4(-1, 0)
        if pid not in procs:
            continue
        name, cmd, log, f = procs.pop(pid)
        f.close()
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"failed: {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
        out[name] = (time.perf_counter() - t0, ru.ru_utime + ru.ru_stime)
    return out


def _harness_outputs(folder: Path):
    results = json.loads(sorted(folder.rglob("results_*.json"))[-1].read_text())
    samples = {}
    for f in folder.rglob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0].removeprefix(PREFIX)
        samples[task] = {r["doc_id"]: r for r in map(json.loads, f.read_text().splitlines())}
    res = {k.removeprefix(PREFIX): v for k, v in results["results"].items()}
    return res, samples


def _margin(lls):
    top = sorted(lls, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("nan")


def compare(out: Path, tasks: list[str], times: dict) -> str:
    """The side-by-side table, the disagreeing rows and the timings, as markdown."""
    h_res, h_samples = _harness_outputs(out / "harness")
    j_doc = json.loads((out / "jaxlm.json").read_text())
    j_samples: dict = {}
    for line in (out / "jaxlm_samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        j_samples.setdefault(r["task"], {})[r["doc_id"]] = r
    lines = ["| task | rows | metric | jaxlm | lm-eval harness | rows that differ |", "|---|---:|---|---:|---:|---:|"]
    notes = []
    for task in tasks:
        jr, hr = j_doc["results"][task], h_res[task]
        js, hs = j_samples[task], h_samples[task]
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" not in jr:
                continue
            differ = []
            for doc_id, row in js.items():
                h = hs[doc_id]
                if metric == "perplexity":
                    continue
                if float(row[metric]) != float(h[metric]):
                    differ.append(doc_id)
            se_j, se_h = jr.get(f"{metric}_stderr,none"), hr.get(f"{metric}_stderr,none")
            fmt = (lambda v, s: f"{v:.4f} ± {s:.4f}")  # noqa: E731
            lines.append(f"| {task} | {len(js)} | {metric} | {fmt(jr[f'{metric},none'], se_j)} | "
                         f"{fmt(hr[f'{metric},none'], se_h)} | {len(differ) if metric != 'perplexity' else '-'} |")
            for doc_id in differ:
                jl = [x[0] for x in js[doc_id]["filtered_resps"]]
                hl = [float(x[0]) for x in hs[doc_id]["filtered_resps"]]
                notes.append(f"- {task} row {doc_id} ({metric}): jaxlm log-likelihoods "
                             f"{[round(x, 5) for x in jl]}, harness {[round(x, 5) for x in hl]}; top-2 margin "
                             f"{_margin(jl):.2e} vs {_margin(hl):.2e}")
        dll = max(abs(a[0] - float(b[0])) for d, r in js.items() for a, b in zip(r["filtered_resps"], hs[d]["filtered_resps"]))
        notes.append(f"- {task}: largest |log-likelihood difference| over all rows and choices {dll:.2e}")
    (th, ch), (tj, cj) = times["harness"], times["jaxlm"]
    how = "at the same time" if times.get("together") else "one after the other"
    lines += ["", f"same machine, {how}: lm-evaluation-harness {th:.0f} s wall ({ch:.0f} s CPU), "
              f"jaxlm {tj:.0f} s wall ({cj:.0f} s CPU): jaxlm {th / tj:.2f}x faster (CPU time {ch / cj:.2f}x)"
              if ch and cj else f"wall time: harness {th:.0f} s, jaxlm {tj:.0f} s: jaxlm {th / tj:.2f}x faster", ""] + notes
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-golden", action="store_true", help="regenerate tests/golden/lm_eval/requests.json")
    ap.add_argument("--checkpoint", default="smollm2-135m-instruct-fp32", help="jaxlm checkpoint or pulled model name")
    ap.add_argument("--hf-dir", help="its Hugging Face export (default: export into --out)")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,lambada")
    ap.add_argument("--limit", type=int, default=500, help="first N rows of each task (arc_challenge has 299)")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--harness-batch-size", default="16")
    ap.add_argument("--out", default="runs/lm_eval_parity")
    ap.add_argument("--data", default=str(DATA / "benchmarks"))
    ap.add_argument("--reuse", action="store_true", help="compare the outputs already in --out")
    ap.add_argument("--together", action="store_true",
                    help="run both sides at the same time (on a machine shared with other work both then see the "
                         "same load; compare their CPU times)")
    a = ap.parse_args()
    if a.write_golden:
        return write_golden()
    sys.path.insert(0, str(ROOT))
    from jaxlm.eval.tasks import get_task

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = a.tasks.split(",")
    files = {t: str(Path(a.data) / Path(get_task(t).file).name) for t in tasks}
    times_file = out / "times.json"
    if a.reuse:
        times = {k: v if isinstance(v, (list, bool)) else [v, 0.0] for k, v in json.loads(times_file.read_text()).items()}
    else:
        hf_dir = a.hf_dir or str(out / "hf")
        if not a.hf_dir and not (out / "hf" / "config.json").exists():
            print(f"exporting {a.checkpoint} to {hf_dir}", flush=True)
            _run([sys.executable, "-m", "jaxlm.cli", "convert", "--to-hf", "--checkpoint", a.checkpoint, "--out", hf_dir,
                  "--overwrite"], out / "convert.log")
        names = write_task_yamls(out / "tasks", files)
        h_cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                 f"pretrained={hf_dir},dtype=float32", "--tasks", ",".join(names), "--include_path",
                 str(out / "tasks"), "--device", "cpu", "--batch_size", a.harness_batch_size,
                 "--limit", str(a.limit), "--num_fewshot", str(a.num_fewshot), "--output_path",
                 str(out / "harness"), "--log_samples"]
        h_env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        j_cmd = [sys.executable, "-m", "jaxlm.cli", "eval", "--checkpoint", a.checkpoint,
                 *[x for t in tasks for x in ("--task", f"{t}={files[t]}")], "--limit", str(a.limit),
                 "--num-fewshot", str(a.num_fewshot), "--output", str(out / "jaxlm.json"),
                 "--samples", str(out / "jaxlm_samples.jsonl")]
        if a.together:
            print("lm-evaluation-harness and jaxlm eval, at the same time ...", flush=True)
            got = _run_together({"harness": (h_cmd, out / "harness.log", h_env), "jaxlm": (j_cmd, out / "jaxlm.log", None)})
            t_h, t_j = got["harness"], got["jaxlm"]
        else:
            print("lm-evaluation-harness ...", flush=True)
            t_h = _run(h_cmd, out / "harness.log", env=h_env)
            print(f"  {t_h[0]:.0f} s\njaxlm eval ...", flush=True)
            t_j = _run(j_cmd, out / "jaxlm.log")
            print(f"  {t_j[0]:.0f} s", flush=True)
        times = {"harness": t_h, "jaxlm": t_j, "together": a.together}
        times_file.write_text(json.dumps(times))
    report = compare(out, tasks, times)
    (out / "summary.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
