"""WildFeedback: satisfaction signals in conversations -> preference pairs -> DPO (jaxlm.recipes.wildfeedback).

    jaxlm recipe wildfeedback --preset mini --config.recipe.data.dir=PATH/TO/data
    jaxlm recipe wildfeedback --config.recipe.data.dir=... \
        --config.recipe.judge.base_url=http://HOST:8000/v1 --config.recipe.judge.model=NAME \
        --config.recipe.teacher.base_url=http://HOST:8000/v1 --config.recipe.teacher.model=NAME

Judge and teacher are OpenAI-protocol endpoints (a stronger model behind vLLM or a hosted API; the key
from $OPENAI_API_KEY, or the variable named by api_key_env); with no base_url, a local `jaxlm serve`
of `checkpoint`. Data paths are relative to recipe.data.dir (or $JAXLM_DATA_DIR) unless absolute.
"""

import ml_collections
from jaxlm.configs.recipes.porover import endpoint


def _endpoint(checkpoint: str, **kw) -> dict:
    ep = endpoint(checkpoint)
    ep.update(max_len=2048, concurrency=8, timeout=900.0, **kw)  # one local server for judge and teacher when they name one checkpoint
    return ep


def get_config():
    recipe = dict(
        dir="runs/wildfeedback",  # run directory (artefacts, state.json, cache/, report.md)
        seed=0,  # train / eval split by conversation, request seeds
        data=dict(
            dir="",  # folder the file name below is relative to ('' = $JAXLM_DATA_DIR)
            conversations="conversations/sharegpt_multiturn.jsonl",  # {"id", "messages": [{"role", "content"}]}
            eval_fraction=0.2,  # of conversations held out for eval (by a seeded hash of the id)
            train_conversations=0,  # kept in file order (the file is shuffled); 0 = all
            eval_conversations=0,
            max_messages=0,  # only conversations of at most N messages (0 = any): fewer turns per conversation
            max_bad_fraction=0.02,  # bad rows (counted with file:line) before the run stops
        ),
        # endpoints: a local `jaxlm serve` of `checkpoint` unless base_url is set
        judge=_endpoint("smollm2-135m-instruct", max_tokens=64, pairwise_max_tokens=256,
                       verdict="text",  # pairwise verdicts: text ([[A]]/[[B]]/[[C]]) | logprobs (log P(A) - log P(B), both orders)
                       tie_margin=0.0,  # logprobs: |score| at most this is a tie
                       max_unparsed=0.5),  # max_unparsed: unparsable SPUR verdicts before the run stops
        teacher=_endpoint("smollm2-135m-instruct"),
        signals=dict(use="judge",  # judge | rules | both: the signals the later stages use
                     gold="",  # hand-labelled turns ('' = jaxlm/assets/wildfeedback_gold/gold.jsonl)
                     gold_turns=0,  # the first N gold turns are classified (0 = all)
                     rule_max_chars=400,  # the rules read the start and end of a long turn
                     judge_max_chars=800),  # the judge sees turns clipped to this
        preferences=dict(max_tokens=96, max_items=4),  # the judge's checklist per DSAT turn
        pairs=dict(context_messages=3,  # the prompt keeps the last N messages before the reply
                   max_chars=600,  # each clipped to this
                   temperature=0.7, max_tokens=192, seed=0,  # the teacher's regeneration
                   filter="both_orders",  # both_orders (the paper) | one_order | none
                   sat_pairs=False,  # also SAT turns: chosen = the satisfying reply, rejected = one ignoring needs
                   max_bad_fraction=0.2),  # failed / empty regenerations
        student=dict(checkpoint="smollm2-135m-instruct"),  # the model aligned (and "base")
        align=dict(steps=0, epochs=2.0, batch_size=8, lr=5e-5, warmup_steps=2, seq_len=512, seed=0,
                   checkpoint_every=25, loss="dpo", beta=0.1, reference="precomputed", max_prompt_length=320,
                   lora_rank=16, lora_alpha=32.0, lora_dropout=0.0),  # loss: dpo | ln_dpo | ...
        eval=dict(max_items=0, max_new_tokens=128, batch_size=16),  # max_items: eval DSAT turns (0 = all)
    )
    presets = {
        # SmolLM2-135M-Instruct as student, teacher and judge on a 2-core CPU (~30 min idle)
        "mini": {"recipe": dict(
            dir="runs/wildfeedback-mini",
            data=dict(train_conversations=96, eval_conversations=48, max_messages=4),
            # 144 conversations of two user turns: 144 feedback turns, about 40 of them DSAT by the rules
            # a 135M judge writes no [[A]]/[[B]] verdicts; its letter log-probabilities, both orders, still rank
            judge=dict(max_tokens=32, pairwise_max_tokens=64, max_unparsed=1.0, verdict="logprobs"),
            signals=dict(judge_max_chars=300),
            preferences=dict(max_tokens=48),
            # a 135M judge rarely writes a parsable [[A]]/[[B]] verdict: keep every regenerated pair
            # (the report still counts the verdicts at each filter)
            pairs=dict(max_chars=300, max_tokens=64, filter="none"),
            align=dict(seq_len=256, max_prompt_length=160, epochs=2.0, batch_size=4),
            eval=dict(max_new_tokens=48))},
    }
    return ml_collections.ConfigDict({"recipe": recipe, "presets": presets})
