"""Small tool-calling trajectories for trainer tests (the procedural suite comes later)."""

import random

from cacherl_jax.chat.trajectory import Trajectory

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


def addition_trajectories(n: int, seed: int = 0, long_every: int = 0) -> list[Trajectory]:
    """`n` conversations: a question, a reasoned `add` call, its result, a short answer.
    With `long_every`, every such trajectory ends in a long answer (for overflow tests: truncation
    keeps its first, trained, tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = f"What is {a} plus {b}?"
        answer = f"{a + b}"
        if long_every and i % long_every == 0:
            answer += " Indeed." * 200
        out.append(
            Trajectory(
                id=f"add-{i}",
                messages=[
                    {"role": "system", "content": "You are a calculator."},
                    {"role": "user", "content": question},
                    {
                        "role": "assistant",
                        "content": "",
                        "reasoning_content": f"I add {a} and {b} with the tool.",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "add", "arguments": {"a": a, "b": b}},
                            }
                        ],
                    },
                    {"role": "tool", "content": str(a + b)},
                    {
                        "role": "assistant",
                        "content": answer,
                        "reasoning_content": "The tool answered.",
                    },
                ],
                tools=[ADD_TOOL],
                metadata={"source": "test"},
            )
        )
    return out
