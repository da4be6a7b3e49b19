"""POROver: over-generation + preference optimisation against over-refusal (jaxlm.recipes.porover).

    jaxlm recipe porover --preset mini --config.recipe.data.dir=PATH/TO/data
    jaxlm recipe porover --config.recipe.data.dir=... --config.recipe.teacher.base_url=http://HOST:8000/v1 \
        --config.recipe.teacher.model=NAME        # teachers behind vLLM or any OpenAI-protocol server
    jaxlm recipe porover ... --config.recipe.judge.mode=llm --config.recipe.judge.base_url=... \
        --config.recipe.judge.model=NAME          # the LLM judge instead of the rules

Data paths are relative to recipe.data.dir (or $JAXLM_DATA_DIR) unless absolute.
"""

import ml_collections

from jaxlm.recipes.porover import GUIDED_SYSTEM


def endpoint(checkpoint: str = "", **kw) -> dict:
    """An OpenAI-protocol endpoint: base_url + model, or (no base_url) a local `jaxlm serve` of checkpoint."""
    return dict(base_url="", model="", checkpoint=checkpoint, api_key_env="OPENAI_API_KEY", concurrency=4,
                retries=5, timeout=300.0, slots=16, max_len=1024, **kw)


def get_config():
    recipe = dict(
        dir="runs/porover",  # run directory (artefacts, state.json, cache/, report.md)
        seed=0,  # splits, sampling seeds, KL samples
        data=dict(
            dir="",  # folder the file names below are relative to ('' = $JAXLM_DATA_DIR)
            xstest="safety/xstest_prompts.csv",  # id,prompt,type,label(safe|unsafe)
            harmful="safety/harmful_prompts.jsonl",  # {"prompt", "source", "category"}
            general="",  # optional: conversations ({"messages"}); their first user turn trains only
            train_fraction=0.5,  # of each stratum (XSTest type; harmful source:category) that trains
            train_seemingly_toxic=0,  # train prompts kept (stratified); 0 = the whole train split
            train_toxic=0,
            train_general=0,
            eval_seemingly_toxic=0,  # eval prompts kept (stratified); 0 = the whole held-out split
            eval_toxic_xstest=0,
            eval_harmful=0,
            max_bad_fraction=0.02,  # bad prompt rows (counted with file:line) before the run stops
        ),
        # endpoints: a local `jaxlm serve` of `checkpoint` unless base_url is set
        teacher=endpoint("smollm2-135m-instruct"),
        judge=endpoint("", mode="rules", max_tokens=16, max_unparsed=0.2),  # mode: rules | llm
        # teachers: NAME -> the endpoint section it uses and its system prompt
        teachers=dict(plain=dict(endpoint="teacher", system=""),
                      guided=dict(endpoint="teacher", system=GUIDED_SYSTEM)),
        overgenerate=dict(teachers="plain,guided", n=8, temperature=0.8, top_p=0.95, max_tokens=256, seed=0,
                          max_bad_fraction=0.1),  # bad: failed requests, empty completions
        student=dict(checkpoint="smollm2-135m-instruct"),  # the model SFT and PO train (and "base")
        sft=dict(steps=0, epochs=3.0, batch_size=8, lr=2e-4, warmup_steps=5, seq_len=384, seed=0,
                 checkpoint_every=25, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0),  # lora_rank 0 = full FT
        po=dict(steps=0, epochs=2.0, batch_size=8, lr=5e-5, warmup_steps=2, seq_len=384, seed=0,
                checkpoint_every=25, loss="dpo", beta=0.1, reference="precomputed", max_prompt_length=128),
        eval=dict(system="", max_new_tokens=64, batch_size=32, kl_prompts=64, kl_max_new_tokens=128, kl_samples=1),
    )
    presets = {
        # SmolLM2-135M-Instruct end to end on a 2-core CPU shared with other jobs (the teacher decoded
        # ~7 tokens/s there): 12 + 12 train prompts x 2 teachers x n=4 completions of <= 64 tokens; one
        # epoch of LoRA SFT and of DPO at a LoRA-sized learning rate; 50 + 30 + 30 held-out eval prompts
        "mini": {"recipe": dict(
            dir="runs/porover-mini",
            data=dict(train_seemingly_toxic=12, train_toxic=12, eval_seemingly_toxic=50, eval_toxic_xstest=30,
                      eval_harmful=30),
            overgenerate=dict(n=4, max_tokens=64),
            sft=dict(seq_len=256, batch_size=4, epochs=1.0, lr=5e-4, warmup_steps=1),
            po=dict(seq_len=160, max_prompt_length=64, batch_size=2, epochs=1.0, lr=2e-4, warmup_steps=1),
            # XSTest's string match reads a reply's opening words: 16 greedy tokens label it
            eval=dict(max_new_tokens=16, batch_size=55, kl_prompts=4, kl_max_new_tokens=16))},
    }
    return ml_collections.ConfigDict({"recipe": recipe, "presets": presets})
