"""GenTool: tool-use data for unseen tools (zero-to-one, weak-to-strong), rank-then-call training
(jaxlm.recipes.gentool).

    jaxlm recipe gentool --preset mini --config.recipe.data.dir=PATH/TO/shared/data
    jaxlm recipe gentool ... --config.recipe.variants.paraphrases=3 \
        --config.recipe.teacher.base_url=http://HOST:8000/v1 --config.recipe.teacher.model=NAME

Data paths are relative to recipe.data.dir (or $JAXLM_DATA_DIR) unless absolute.
"""

import ml_collections


def endpoint(checkpoint: str = "", **kw) -> dict:
    """An OpenAI-protocol endpoint: base_url + model, or (no base_url) a local `jaxlm serve` of checkpoint."""
    return dict(base_url="", model="", checkpoint=checkpoint, api_key_env="OPENAI_API_KEY", concurrency=4,
                retries=5, timeout=300.0, slots=8, max_len=1024, **kw)


def get_config():
    sft = dict(steps=0, epochs=2.0, batch_size=8, lr=2e-4, warmup_steps=5, seq_len=1024, seed=0, checkpoint_every=25,
               lora_rank=16, lora_alpha=32.0, lora_dropout=0.0,  # lora_rank 0 = full fine-tuning
               remat_policy="full", grad_accum=1)  # remat: rows of several tool schemas are long
    recipe = dict(
        dir="runs/gentool",  # run directory (artefacts, state.json, cache/, report.md)
        seed=0,  # the tool split, samples, candidate order
        data=dict(
            dir="",  # folder the names below are relative to ('' = $JAXLM_DATA_DIR)
            tools_dir="tools",  # BFCL v4 files (JSON Lines) and possible_answer/
            answers_dir="possible_answer",
            calls="BFCL_v4_simple_python.json,BFCL_v4_multiple.json,BFCL_v4_live_simple.json,"
                  "BFCL_v4_live_multiple.json",  # single-call categories with possible answers
            irrelevance="BFCL_v4_irrelevance.json",  # rows whose right answer is no call
            eval_fraction=0.3,  # of the tools (by name) held out for eval
            max_tool_chars=0,  # leave out rows offering a tool whose JSON is longer (0 = keep all)
            train_rows=0, eval_rows=0,  # call rows kept per split (seeded sample; 0 = all)
            train_irrelevance=0, eval_irrelevance=0,  # irrelevance rows kept per split
            max_bad_fraction=0.02,  # bad rows (counted with file:line) before the run stops
        ),
        teacher=endpoint("smollm2-135m-instruct"),  # used only for rewrites / paraphrases below
        variants=dict(teacher_rewrite=False,  # the teacher rewrites each weak variant's description
                      paraphrases=0,  # teacher paraphrases per train query (0 = BFCL's queries only)
                      temperature=0.8, max_tokens=96, max_bad_fraction=0.2),
        scenarios=dict(neighbours=4),  # BM25 neighbours beside the gold tool
        format=dict(scenarios="all"),  # train scenarios (comma list, or all)
        student=dict(checkpoint="smollm2-135m-instruct"),  # the model trained (and "base")
        stage1=dict(sft),  # ranking
        stage2=dict(sft),  # calling (from stage 1, and from the student for the ablation)
        ablation=True,  # also train stage 2 alone from the student (the stage-2-only model)
        eval=dict(per_scenario=0, batch_size=16, rank_max_new_tokens=96, call_max_new_tokens=96,
                  serve_requests=4),  # per_scenario: held-out examples per scenario (0 = all)
    )
    small = dict(steps=12, batch_size=4, lr=3e-4, warmup_steps=2, seq_len=1024, lora_rank=8, lora_alpha=16.0,
                 checkpoint_every=6, grad_accum=2, remat_policy="none")
    presets = {
        # SmolLM2-135M-Instruct on an idle 2-core CPU in about an hour: short tools (JSON <= 600 chars), the
        # issue's four BM25 neighbours, a 32 + 16 row sample, 12 steps of 4 rows (~48 of the ~118 records)
        # per training stage: ~55 s a step, the CPU's fp32 matmul rate (0.19 TFLOP/s) bounds it
        "mini": {"recipe": dict(
            dir="runs/gentool-mini",
            data=dict(calls="BFCL_v4_simple_python.json,BFCL_v4_multiple.json", max_tool_chars=600,
                      train_rows=32, eval_rows=16, train_irrelevance=8, eval_irrelevance=8),
            stage1=small, stage2=small,
            eval=dict(per_scenario=6, batch_size=14, rank_max_new_tokens=64, call_max_new_tokens=64,
                      serve_requests=2))},
    }
    return ml_collections.ConfigDict({"recipe": recipe, "presets": presets})
