"""The augment pipeline with our own model as the teacher: over real HTTP through the server of
`cacherl serve` on 127.0.0.1 (the endpoint teacher), and through our sampler in-process (the
local-checkpoint teacher).

The tiny model is trained here for a few seconds to answer the two teacher prompts of one
trajectory (its call step and its answer step) with fixed reasonings, so what comes back is the
model's own greedy output, parsed by the server, not a scripted reply.
"""

import dataclasses
import json
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_augment import conversation, make_config, write_input

from cacherl_jax.chat import load_tokenizer, render, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.chat.trajectory import Trajectory, load_jsonl
from cacherl_jax.data.thinking import AugmentRules, augment, plan_record, teacher_messages
from cacherl_jax.data.thinking.rules import keeps_thinking
from cacherl_jax.model import (
    Qwen3Config,
    forward,
    init_params,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from cacherl_jax.sampling import Sampler
from cacherl_jax.serve import server as server_lib

# Whole trainers or servers end to end: `pytest -m "not slow"` (make test-fast) skips them.
pytestmark = pytest.mark.slow

MODEL = "tiny-teacher"
NO_THINKING_SHARE = 0.5
REPLIES = {
    "call": "I need the sum of 12 and 30, so I call add with a=12 and b=30.",
    "answer": "The add tool returned 42, which answers the question directly.",
}
RULES = AugmentRules(no_thinking_share=NO_THINKING_SHARE)
# One record the teacher explains and one the no-thinking share keeps as it is.
THINKING_ID = next(f"t{i}" for i in range(100) if keeps_thinking(f"t{i}", RULES))
PLAIN_ID = next(f"p{i}" for i in range(100) if not keeps_thinking(f"p{i}", RULES))


def _teacher_conversations():
    """(teacher prompt + the reply to learn) for each step of the thinking record."""
    plan = plan_record(Trajectory.from_dict(conversation(THINKING_ID, 12, 30)), RULES)
    return [
        [*teacher_messages(step), {"role": "assistant", "content": REPLIES[step.kind]}]
        for step in plan.steps
    ]


def _memorise(config, tokens_BxT, mask_BxT, max_steps=300):
    """Adam on a few sequences until greedy decoding reproduces their trained tokens."""
    # One attention block: the same function, and a backward pass that compiles 3x faster on CPU.
    config = dataclasses.replace(config, attention_block=None)
    tokens = jnp.asarray(tokens_BxT)
    targets, weights = tokens[:, 1:], jnp.asarray(mask_BxT[:, 1:], jnp.float32)

    def loss(params):
        logp = jax.nn.log_softmax(forward(params, config, tokens[:, :-1]), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = init_params(config, jax.random.key(0))
    state = optimizer.init(params)
    for index in range(max_steps):
        params, state, value = step(params, state)
        if index % 20 == 19 and float(value) < 5e-3:
            break
    final = float(loss(params))
    assert final < 1e-2, f"the test model did not memorise its replies (loss {final})"
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model that answers the teacher prompts, saved as a Hugging Face directory."""
    conversations = _teacher_conversations()
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(
        [render_text(c) for c in conversations] * 20, 1024, tokenizer_dir, from_files=False
    )
    rendered = [render(c, None, tokenizer) for c in conversations]
    T = max(len(r) for r in rendered)
    tokens_BxT = np.zeros((len(rendered), T), np.int32)  # right-padded: causal attention ignores it
    mask_BxT = np.zeros((len(rendered), T), np.int8)
    for row, r in enumerate(rendered):
        tokens_BxT[row, : len(r)], mask_BxT[row, : len(r)] = r.token_ids, r.loss_mask
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    params = _memorise(config, tokens_BxT, mask_BxT)
    path = tmp_path_factory.mktemp("checkpoint")
    save_hf_checkpoint(config, params, path)
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture
def records_file(tmp_path):
    return write_input(
        tmp_path / "in.jsonl", [conversation(THINKING_ID, 12, 30), conversation(PLAIN_ID, 1, 2)]
    )


def _check_output(config, summary):
    written = {t.id: t for t in load_jsonl(config.output)[0]}
    assert sorted(written) == sorted([THINKING_ID, PLAIN_ID])
    thinking, plain = written[THINKING_ID], written[PLAIN_ID]
    assert thinking.messages[2]["reasoning_content"] == REPLIES["call"]
    assert thinking.messages[4]["reasoning_content"] == REPLIES["answer"]
    text = render_text(thinking.messages, thinking.tools)
    assert f"<think>\n{REPLIES['call']}\n</think>\n\n<tool_call>\n" in text
    assert f"<think>\n{REPLIES['answer']}\n</think>\n\nThe answer is 42.<|im_end|>" in text
    assert all("reasoning_content" not in m for m in plain.messages)
    assert plain.metadata["augment"]["thinking"] is False
    run = summary["run"]
    assert run["teacher_requests"] == 2 and run["rejected"] == 0 and run["rejection_reasons"] == {}
    assert run["prompt_tokens"] > 200 and run["completion_tokens"] >= 2 * 10
    return run


def test_cacherl_serve_as_the_teacher(checkpoint, records_file, tmp_path):
    # What `cacherl serve --checkpoint DIR --port 0` runs, in a thread of this process.
    config, params = load_hf_checkpoint(checkpoint)
    chat_server = server_lib.make_server(
        Sampler(params, config),
        load_tokenizer(checkpoint),
        port=0,
        model_name=MODEL,
        context_len=1024,
        batch_window_s=0.05,
    )
    thread = threading.Thread(target=chat_server.serve_forever, daemon=True)
    thread.start()
    try:
        augment_config = make_config(
            tmp_path, records_file, "endpoint",
            teacher__endpoint__base_url=chat_server.url + "/v1",
            teacher__endpoint__model=MODEL,
            teacher__endpoint__temperature=0.0,
            teacher__endpoint__max_tokens=64,
            teacher__endpoint__timeout_s=300.0,
            teacher__endpoint__concurrency=2,
            rules__no_thinking_share=NO_THINKING_SHARE,
        )  # fmt: skip
        summary = augment(augment_config, progress=False)
    finally:
        chat_server.shutdown_all()
        thread.join()
    run = _check_output(augment_config, summary)
    assert run["teacher"] == f"endpoint:{MODEL}"
    assert chat_server.engine.batch_sizes  # the requests went through the server's sampler


def test_local_checkpoint_teacher(checkpoint, records_file, tmp_path):
    augment_config = make_config(
        tmp_path, records_file, "local",
        teacher__local__checkpoint=str(checkpoint),
        teacher__local__temperature=0.0,
        teacher__local__max_tokens=64,
        teacher__local__context_len=1024,
        teacher__local__max_batch=2,
        rules__no_thinking_share=NO_THINKING_SHARE,
    )  # fmt: skip
    summary = augment(augment_config, progress=False)
    run = _check_output(augment_config, summary)
    assert run["teacher"] == f"local:{checkpoint.name}"
    assert json.loads(json.dumps(summary))["status"] == "completed"
