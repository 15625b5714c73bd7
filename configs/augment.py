"""Hybrid thinking trajectories: teacher reasoning for each step of agent trajectories.

    cacherl augment --config=configs/augment.py --input=data/raw.jsonl --output=data/thinking.jsonl
    cacherl augment --config=configs/augment.py:endpoint --input=bfcl:multi_turn_base \
        --output=data/bfcl.thinking.jsonl --config.teacher.endpoint.base_url=http://gpu:8000/v1 \
        --config.teacher.endpoint.model=Qwen/Qwen3-235B-A22B --config.tool_cache.path=data/cache.sqlite
    cacherl augment --config=configs/augment.py:local --input=procedural:train:1000 \
        --output=data/proc.thinking.jsonl --config.teacher.local.checkpoint=/ckpt/Qwen3-4B

`arg` picks the teacher: `template` (default; deterministic reasoning from the request, the
schema and the call: offline and free), `endpoint` (any OpenAI-compatible server; the API key is
read from the variable `teacher.endpoint.api_key_env` names) or `local` (a checkpoint on this host
through our sampler). The input is a trajectory JSONL path, `bfcl:CATEGORY` (ground truth executed
live) or `procedural:SPLIT:N[:SEED]` (the reference solver). Every field can be overridden on the
command line.
"""

import ml_collections

from configs import common

VARIANTS = ("template", "endpoint", "local")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = common.variant("augment", arg, VARIANTS)

    config = ml_collections.ConfigDict()
    config.variant = variant
    config.output = ""  # the augmented JSONL; `.rejected.jsonl` and `.summary.json` sit beside it

    config.input = ml_collections.ConfigDict()
    config.input.spec = ""  # FILE.jsonl | bfcl:multi_turn_base | procedural:train:1000[:SEED]
    config.input.on_error = "raise"  # JSONL: or "skip" (bad records counted by file:line:field)
    config.input.limit = 0  # bfcl: first N tasks (0: all)
    config.input.bfcl_ids = ()
    config.input.seed = 0  # procedural seed when the spec gives none
    config.input.domains = ()
    config.input.kinds = ()
    config.input.tools = "kind"  # procedural: the task's tools, or "domain" for all of them
    config.input.solver_reasoning = False  # keep the solver's plain reasoning as existing text

    # Every (call, result) the input holds is recorded here too ("" : no cache).
    config.tool_cache = ml_collections.ConfigDict()
    config.tool_cache.path = ""
    config.tool_cache.scope = (
        "trajectory"  # "none" | "trajectory" (state-dependent tools) | "world"
    )

    config.teacher = ml_collections.ConfigDict()
    config.teacher.kind = variant
    config.teacher.endpoint = ml_collections.ConfigDict()
    config.teacher.endpoint.base_url = "http://127.0.0.1:8000/v1"
    config.teacher.endpoint.model = "teacher"
    config.teacher.endpoint.api_key_env = "OPENAI_API_KEY"
    config.teacher.endpoint.concurrency = 16
    config.teacher.endpoint.timeout_s = 120.0
    config.teacher.endpoint.max_retries = 5
    config.teacher.endpoint.backoff_initial_s = 1.0
    config.teacher.endpoint.backoff_max_s = 60.0
    config.teacher.endpoint.temperature = 0.7
    config.teacher.endpoint.top_p = 1.0
    config.teacher.endpoint.max_tokens = 1024
    config.teacher.endpoint.send_seed = True
    config.teacher.endpoint.price_input_per_mtok = 0.0  # USD per million tokens, for the cost
    config.teacher.endpoint.price_output_per_mtok = 0.0
    # Extra request fields as JSON, e.g. '{"chat_template_kwargs": {"enable_thinking": false}}'
    # for a vLLM/SGLang Qwen3 teacher that should answer without thinking first.
    config.teacher.endpoint.extra_body_json = ""

    config.teacher.local = ml_collections.ConfigDict()
    config.teacher.local.checkpoint = ""
    config.teacher.local.tokenizer = ""  # "" : the checkpoint's tokenizer.json
    config.teacher.local.max_batch = 32
    config.teacher.local.batch_window_s = 0.05
    config.teacher.local.temperature = 0.7
    config.teacher.local.top_p = 1.0
    config.teacher.local.max_tokens = 512
    config.teacher.local.context_len = 4096
    config.teacher.local.enable_thinking = False

    config.rules = ml_collections.ConfigDict()
    config.rules.no_thinking_share = 0.0  # records kept without thinking (hybrid data)
    config.rules.seed = 0  # picks those records and the teacher's sampling seeds
    config.rules.steps = "rendered"  # "rendered": steps after the last user query; or "all"
    config.rules.wrap_existing_text = True  # text before a call becomes its thinking
    config.rules.keep_existing_reasoning = True
    config.rules.max_attempts = 3  # teacher replies per step before on_invalid applies
    config.rules.on_invalid = "drop_record"  # | "drop_thinking" | "template"
    config.rules.min_chars = 20
    config.rules.max_chars = 4000
    config.rules.require_tool_mention = True
    config.rules.forbid_call_syntax = True

    config.prompt = ml_collections.ConfigDict()
    config.prompt.max_result_chars = 1500  # per tool result in the teacher's prompt
    config.prompt.max_context_messages = 40

    config.run = ml_collections.ConfigDict()
    config.run.max_cost_usd = 0.0  # 0: no budget
    config.run.max_pending_steps = 0  # 0: 4 x the teacher's concurrency
    config.run.fsync_every = 16
    config.run.fsync_interval_s = 1.0
    config.run.retry_rejected = True
    return config
