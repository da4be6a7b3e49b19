"""GPA: group preference alignment (jaxlm.recipes.gpa).

    jaxlm recipe gpa --preset mini --config.recipe.data.dir=PATH/TO/data
    jaxlm recipe gpa --config.recipe.data.dir=... --config.recipe.judge.base_url=http://HOST:8000/v1 \
        --config.recipe.judge.model=NAME --config.recipe.teacher.base_url=... --config.recipe.teacher.model=NAME

Data paths are relative to recipe.data.dir (or $JAXLM_DATA_DIR) unless absolute.
"""

import ml_collections
from jaxlm.configs.recipes.porover import endpoint


def get_config():
    recipe = dict(
        dir="runs/gpa",  # run directory (artefacts, state.json, cache/, report.md)
        seed=0,  # sample, split, pair prompts, teacher seeds
        data=dict(
            dir="",  # folder the file names below are relative to ('' = $JAXLM_DATA_DIR)
            conversations="conversations/sharegpt_multiturn.jsonl",  # {"id", "messages": [{"role", "content"}]}
            limit=0,  # conversations kept (seeded sample); 0 = all
            balance=True,  # with a limit: as many conversations of each rule group as there are (then the rest)
            eval_fraction=0.2,  # of the conversations held out for eval (by conversation)
            max_chars=1500,  # per user turn shown to judge and teacher (assistant turns: a third)
            max_total_chars=6000,  # per conversation shown to the judge (later turns are left out)
            max_bad_fraction=0.02,  # bad rows (counted with file:line) before the run stops
        ),
        labels=dict(
            mode="judge",  # judge (rules when unparsable) | rules | field (group_field / intent_field of a row)
            groups="developer,general",  # the rules know developer (code in the user's turns) and general
            intents="coding,writing,explanation,advice",
            group_field="group", intent_field="intent",  # mode=field: the row's fields
            max_tokens=48,
        ),
        extract=dict(mode="judge", max_items=6, max_tokens=160,  # mode: judge (rules when unparsable) | rules | both
                     max_unparsed=1.0),  # unparsable judge replies (they fall back to the rules) before stopping
        normalise=dict(canonicalise=True,  # the judge rewrites each distinct statement into a short phrase
                       similarity=0.6,  # TF-IDF (char 3-5-gram) cosine at which two statements are one item
                       max_tokens=24),
        contrast=dict(prior_strength=10.0,  # a0: total pseudo-count of the pooled-counts prior (0 = raw counts)
                      min_count=2),  # items mentioned fewer times (both sides) are not ranked
        rubrics=dict(top_k=5, z_min=1.0, min_conversations=3, write_with_judge=True, max_tokens=256),
        # endpoints: a local `jaxlm serve` of `checkpoint` unless base_url is set
        judge=endpoint("smollm2-135m-instruct",
                       verdict="text",  # pairwise verdicts: text ([[A]]/[[B]]/[[C]]) | logprobs (log P(A) - log P(B))
                       tie_margin=0.0),  # logprobs: |score| at most this is a tie
        teacher=endpoint("smollm2-135m-instruct"),
        pairs=dict(per_rubric=16, temperature=0.7, max_tokens=192, judge_max_tokens=256,
                   filter="both_orders",  # both_orders | one_order | none (unvalidated: a judge too weak to judge)
                   max_bad_fraction=0.1),  # failed / empty teacher replies
        student=dict(checkpoint="smollm2-135m-instruct"),
        align=dict(enabled=True, min_pairs=2, steps=0, epochs=2.0, batch_size=4, lr=1e-4, warmup_steps=2,
                   seq_len=384, seed=0, checkpoint_every=25, loss="ln_dpo", beta=0.1, reference="adapters_off",
                   max_prompt_length=192, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0),
        eval=dict(per_group=50, models="base,ct,ft,cross", max_new_tokens=128, batch_size=16, judge_max_tokens=256,
                  routing=True),  # ft/cross through one mixture-of-LoRAs model (False: each adapter merged alone)
    )
    presets = {
        # SmolLM2-135M-Instruct on a 2-core CPU. A 135M judge cannot label groups or extract preferences
        # (no parsable reply for 32 of 32 labels in a trial), so the data stages use the rules over all 2,964
        # conversations; the judge writes the rubric lines and gives letter log-probability verdicts, the
        # teacher writes 4 pairs per rubric (kept unvalidated: the judge's verdicts are reported, not
        # trusted), 8 LN-DPO steps per group, 10 held-out prompts per group
        "mini": {"recipe": dict(
            dir="runs/gpa-mini",
            data=dict(limit=0, eval_fraction=0.3, max_chars=400, max_total_chars=1000),
            labels=dict(mode="rules"), extract=dict(mode="rules"),
            normalise=dict(canonicalise=False),
            rubrics=dict(top_k=4, z_min=1.0, min_conversations=3, max_tokens=128),
            judge=dict(concurrency=8, timeout=3000.0, verdict="logprobs"), teacher=dict(concurrency=8, timeout=3000.0),
            pairs=dict(per_rubric=4, max_tokens=64, judge_max_tokens=48, filter="none"),
            align=dict(steps=8, batch_size=2, seq_len=256, max_prompt_length=128),
            eval=dict(per_group=10, max_new_tokens=40, batch_size=8, judge_max_tokens=48))},
    }
    return ml_collections.ConfigDict({"recipe": recipe, "presets": presets})
