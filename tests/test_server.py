"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the `openai` client.

The model is a tiny Qwen3 trained here for a few seconds to memorise one tool-calling
conversation (call `add`, read the result, answer), so the tool-call round trip is the model's own
greedy output parsed by the server, not a scripted reply. It is saved as a Hugging Face
checkpoint with its tokenizer and loaded the way `cacherl serve` loads one.
"""

import argparse
import concurrent.futures
import functools
import http.client
import json
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import openai
import optax
import pytest

from cacherl_jax.chat import render, render_prompt, render_text
from cacherl_jax.chat.tokenizer import train_tokenizer
from cacherl_jax.model import Qwen3Config, forward, init_params, save_hf_checkpoint
from cacherl_jax.sampling import Generation, Sampler
from cacherl_jax.serve import server as server_lib

MODEL = "tiny-add"
CONTEXT = 512
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        },
    },
}
REQUEST = [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 12 plus 30?"},
]
CALL_TURN = {
    "role": "assistant",
    "content": "",
    "reasoning_content": "I add 12 and 30 with the tool.",
    "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
    ],
}
RESULT_TURN = {"role": "tool", "content": '{"sum": 42}'}
ANSWER_TURN = {
    "role": "assistant",
    "content": "The answer is 42.",
    "reasoning_content": "The tool says 42.",
}
CONVERSATION = [*REQUEST, CALL_TURN, RESULT_TURN, ANSWER_TURN]


def _memorise(config, tokens_T, mask_T, steps=100):
    """Adam on one sequence until greedy decoding reproduces its trained tokens."""
    tokens = jnp.asarray(tokens_T[None])
    targets, weights = tokens[:, 1:], jnp.asarray(mask_T[None, 1:], jnp.float32)

    def loss(params):
        logp = jax.nn.log_softmax(forward(params, config, tokens[:, :-1]), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(_, carry):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params, _ = jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))
        return params, loss(params)

    params, final = train(init_params(config, jax.random.key(0)))
    assert float(final) < 1e-2, f"the test model did not memorise its conversation (loss {final})"
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained tiny model saved as a Hugging Face directory with its tokenizer.json."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(
        [render_text(CONVERSATION, [ADD_TOOL])] * 20, 1024, tokenizer_dir, from_files=False
    )
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    rendered = render(CONVERSATION, [ADD_TOOL], tokenizer)
    params = _memorise(config, rendered.token_ids, rendered.loss_mask)
    path = tmp_path_factory.mktemp("checkpoint")
    save_hf_checkpoint(config, params, path)
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    config, params, tokenizer = server_lib._load(str(checkpoint), None)  # what `cacherl serve` does
    chat_server = server_lib.make_server(
        Sampler(params, config),
        tokenizer,
        port=0,
        model_name=MODEL,
        context_len=CONTEXT,
        batch_window_s=0.25,  # long enough that concurrent test requests meet in one batch
        default_max_tokens=64,
    )
    thread = threading.Thread(target=chat_server.serve_forever, daemon=True)
    thread.start()
    yield chat_server
    chat_server.shutdown_all()
    thread.join()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server, path, body: bytes, headers=None):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    connection.request(
        "POST", path, body=body, headers=headers or {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def _get(server, path):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


# --- over HTTP --------------------------------------------------------------------------------------


def test_health_and_models(server, client):
    assert _get(server, "/health") == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_tool_calling_round_trip(server, client):
    """The model calls `add`; the client runs it and sends the result back; the model answers."""
    first = client.chat.completions.create(
        model=MODEL, messages=REQUEST, tools=[ADD_TOOL], temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == CALL_TURN["reasoning_content"]
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 12, "b": 30}

    # What an agent loop sends next: the assistant turn as returned, then the tool's result.
    arguments = json.loads(call.function.arguments)
    messages = [
        *REQUEST,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": choice.message.reasoning_content,
            "tool_calls": [call.model_dump()],
        },
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"sum": sum(arguments.values())}),
        },
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ADD_TOOL], temperature=0
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop"
    assert answer.message.content == ANSWER_TURN["content"]
    assert answer.message.reasoning_content == ANSWER_TURN["reasoning_content"]
    assert not answer.message.tool_calls
    # The client's JSON-string arguments render back to exactly the tokens the model was trained on.
    expected_prompt = render_prompt(CONVERSATION[:4], [ADD_TOOL], server.tokenizer)
    assert second.usage.prompt_tokens == len(expected_prompt)
    assert second.usage.completion_tokens == len(
        server.tokenizer.encode(
            "<think>\nThe tool says 42.\n</think>\n\nThe answer is 42.<|im_end|>"
        )
    )


def test_concurrent_requests_are_batched(server, client):
    """Requests sent together run as one batch, and each gets what it would get alone."""
    questions = ["What is 12 plus 30?", "What is 3 plus 4?", "Add 10 and 20.", "What is 1 plus 1?"]

    def ask(question, seed):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[REQUEST[0], {"role": "user", "content": question}],
            tools=[ADD_TOOL],
            temperature=1.0,
            seed=seed,
            logprobs=True,
        )
        choice = response.choices[0]
        return [t.token for t in choice.logprobs.content], [
            t.logprob for t in choice.logprobs.content
        ]

    batches_before = len(server.engine.batch_sizes)
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions, range(len(questions))))
    sizes = server.engine.batch_sizes[batches_before:]
    assert sum(sizes) == len(questions) and max(sizes) >= 2, sizes
    for i, question in enumerate(questions[:2]):
        tokens, logprobs = ask(question, i)
        assert tokens == together[i][0]
        np.testing.assert_allclose(logprobs, together[i][1], atol=1e-4)


def test_n_choices_and_stop_strings(client):
    response = client.chat.completions.create(
        model=MODEL, messages=REQUEST, tools=[ADD_TOOL], temperature=1.0, n=3, seed=0
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens <= 3 * 64
    cut = client.chat.completions.create(
        model=MODEL, messages=REQUEST, tools=[ADD_TOOL], temperature=0, stop=["with"]
    )
    message = cut.choices[0].message
    assert cut.choices[0].finish_reason == "stop"
    assert message.reasoning_content.startswith("I add 12")  # cut inside the think block
    assert "with" not in message.reasoning_content + (message.content or "")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'["a list"]', "must be a JSON object"),
        (json.dumps({"model": MODEL}).encode(), "'messages' must be a non-empty list"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), "role must be one of"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "content must be a string"),
        (json.dumps({"messages": REQUEST, "temperature": "hot"}).encode(), "'temperature' must be a number"),
        (json.dumps({"messages": REQUEST, "max_tokens": 0}).encode(), "'max_tokens' must be in"),
        (json.dumps({"messages": REQUEST, "stream": True}).encode(), "stream=true is not supported"),
        (json.dumps({"messages": REQUEST, "tools": [{"type": "function"}]}).encode(), "tools[0] must be"),
    ],
)  # fmt: skip
def test_malformed_requests_get_400_with_a_json_error(server, body, message):
    status, payload = _post(server, "/v1/chat/completions", body)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert message in payload["error"]["message"]


def test_openai_client_sees_400_and_404(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.status_code == 400
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=REQUEST)


def test_unknown_route_is_a_json_404(server):
    status, payload = _get(server, "/v1/completions")
    assert status == 404 and "no route" in payload["error"]["message"]


def test_over_long_prompt_is_a_clear_400(server, client):
    long_question = "What is 12 plus 30? " * 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_question}]
        )
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert f"context is {CONTEXT} tokens" in error["message"]
    status, payload = _post(
        server,
        "/v1/chat/completions",
        json.dumps({"messages": REQUEST, "max_tokens": CONTEXT}).encode(),
    )
    assert status == 400 and "exceeds the 512-token context" in payload["error"]["message"]
    # The server is still serving afterwards.
    assert _get(server, "/health")[0] == 200


# --- response building from given tokens ----------------------------------------------------------


@functools.cache
def _tokenizer_for_units(path):
    from cacherl_jax.chat.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _generation(tokenizer, text, stop_reason="stop"):
    ids = tokenizer.encode(text)
    return Generation(
        token_ids=np.asarray(ids, np.int32),
        logprobs=np.full(len(ids), -0.5, np.float32),
        raw_logprobs=np.full(len(ids), -0.5, np.float32),
        stop_reason=stop_reason,
    )


def test_choice_from_tool_call_tokens(checkpoint):
    tokenizer = _tokenizer_for_units(str(checkpoint))
    text = (
        "<think>\nI need two calls.\n</think>\n\nLet me add.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": "é", "b": [3]}}\n</tool_call><|im_end|>'
    )
    choice = server_lib.completion_choice(0, _generation(tokenizer, text), tokenizer, logprobs=True)
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "I need two calls."
    assert message["content"] == "Let me add."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["add", "add"]
    assert message["tool_calls"][1]["function"]["arguments"] == '{"a": "é", "b": [3]}'
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert len(choice["logprobs"]["content"]) == len(tokenizer.encode(text))


def test_choice_without_calls_and_truncated(checkpoint):
    tokenizer = _tokenizer_for_units(str(checkpoint))
    plain = server_lib.completion_choice(
        0, _generation(tokenizer, "<think>\n\n</think>\n\nThe answer is 42.<|im_end|>"), tokenizer
    )
    assert plain["finish_reason"] == "stop"
    assert plain["message"] == {"role": "assistant", "content": "The answer is 42."}
    truncated = server_lib.completion_choice(
        0, _generation(tokenizer, '<tool_call>\n{"name": "ad', "length"), tokenizer
    )
    assert truncated["finish_reason"] == "length"
    assert "tool_calls" not in truncated["message"]  # an unclosed call is never returned


def test_register_cli_adds_the_serve_command():
    parser = argparse.ArgumentParser()
    server_lib.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--checkpoint", "ckpt", "--port", "0", "--host", "0.0.0.0"])
    assert (args.command, args.checkpoint, args.port, args.host) == ("serve", "ckpt", 0, "0.0.0.0")
    assert args.tokenizer is None and args.run is server_lib._serve_command
