"""Builds the pretrained miniature base: the tiny Qwen3 trained on a generic synthetic corpus, the
analogue of the pretrained Qwen3 the paper starts from (it can copy values and look up keys, but
has never seen a tool, a task or the tool-call format).

    .venv/bin/python experiments/build_tiny_base.py --seed 0 --out runs/tiny_base

Steps: corpus (`cacherl_jax.data.pretrain_corpus`) -> tokenizer -> pretraining (`sft.train` with
`configs/sft.py:tiny_pretrain`; each document's answer trained, the copied, looked-up or computed
span, or with `--loss all` every token) -> Hugging Face export
(config.json, model.safetensors, tokenizer.json, cacherl_tokenizer.json) -> probe -> build.json.

The tokenizer is a byte-level BPE trained on the corpus and on the text of the procedural suite's
training trajectories, as a real base model's tokenizer has seen text of every kind it will meet;
the weights see only the corpus. (Trained on the corpus alone, the SFT examples would take twice
as many tokens.)

The probe: greedy continuation of held-out documents (their own split of the corpus generator)
from the text before the answer; a document counts when the continuation reproduces the answer
exactly. Printed per kind for the random init and the base, then one JSON line. `build.json`
records the command, seed, steps, corpus size and sha256, the files' sha256, the final loss, the
git commit, the wall time and the probe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from cacherl_jax import pipeline_demo
from cacherl_jax.agent.procedural import generate_tasks
from cacherl_jax.agent.procedural.solver import reference_trajectory
from cacherl_jax.chat import Tokenizer, load_tokenizer, train_tokenizer
from cacherl_jax.chat.template import render_text
from cacherl_jax.data import pretrain_corpus
from cacherl_jax.model import init_params, load_hf_checkpoint
from cacherl_jax.sampling.sampler import Sampler, SamplingParams
from cacherl_jax.train import sft

SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "cacherl_tokenizer.json")
REPO = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_corpus(path: Path, documents: int, seed: int, *, answers_only: bool) -> dict:
    """The training documents as JSONL; returns their count, size, sha256 and what is trained."""
    pretrain_corpus.write_corpus(
        path, pretrain_corpus.generate_documents(documents, seed), answers_only=answers_only
    )
    return {
        "documents": documents,
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "loss_on": "answers" if answers_only else "all",
    }


def build_tokenizer(
    corpus: Path, out: Path, *, vocab_size: int, pattern: str, tasks: int, seed: int
) -> Tokenizer:
    """A BPE on the corpus plus the text of `tasks` procedural training trajectories."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    for task in generate_tasks("train", tasks, seed):
        trajectory = reference_trajectory(task, reasoning=True)
        texts.append(render_text(trajectory.messages, trajectory.tools))
    return train_tokenizer(texts, vocab_size, out, from_files=False, pattern=pattern)


def pretrain(corpus: Path, tokenizer_dir: Path, workdir: Path, args: argparse.Namespace):
    """`sft.train` on the documents (configs/sft.py:tiny_pretrain); returns the config and the
    run's summary."""
    config = pipeline_demo.load_config("sft", "tiny_pretrain")
    config.seed = args.seed
    config.data.train = str(corpus)
    config.tokenizer.spec = str(tokenizer_dir)
    config.train.steps = args.steps
    config.train.checkpoint_every = args.steps
    for field, value in (("batch_size", args.batch_size), ("seq_len", args.seq_len)):
        if value is not None:
            config.data[field] = value
    if args.lr is not None:
        config.train.lr = args.lr
    # One device: the tiny model gains nothing from sharding, and compiles faster unsharded.
    return config, sft.train(config, workdir, progress=args.progress, devices=jax.devices()[:1])


def ship(workdir: Path, tokenizer_dir: Path, out: Path) -> None:
    """The export's files (and the tokenizer's description) into `out`, replacing it."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SHIPPED:
        source = tokenizer_dir if name == "cacherl_tokenizer.json" else workdir / "hf"
        shutil.copyfile(source / name, out / name)


# --- the probe ---------------------------------------------------------------------------------


def _split_at_answer(tokenizer: Tokenizer, document: pretrain_corpus.Document) -> tuple[list, int]:
    """The document's tokens and the index of the first token reaching into the answer (the
    prompt stops at a token boundary, so a trailing space is not a lone token)."""
    ids = tokenizer.encode(document.text)
    chars = 0
    for index, token_id in enumerate(ids):
        chars += len(tokenizer.decode([token_id]))
        if chars > len(document.prompt):
            return ids, index
    return ids, len(ids)


def probe(params, model, tokenizer: Tokenizer, documents) -> dict[str, float]:
    """Exact-answer accuracy of greedy continuations, per kind, `copy` over the copy kinds."""
    prompts, targets, budgets = [], [], []
    for document in documents:
        ids, cut = _split_at_answer(tokenizer, document)
        prompts.append(ids[:cut])
        targets.append(document.prompt + document.answer)
        budgets.append(len(ids) - cut)
    sampling = SamplingParams(
        temperature=0.0,
        max_new_tokens=max(budgets) + 2,
        stop_token_ids=(tokenizer.special.endoftext,),
    )
    generations = Sampler(params, model).generate(prompts, sampling)
    hits: dict[str, list[bool]] = {}
    for document, prompt, target, generation in zip(
        documents, prompts, targets, generations, strict=True
    ):
        text = tokenizer.decode([*prompt, *generation.token_ids.tolist()])
        hits.setdefault(document.kind, []).append(text.startswith(target))
    result = {kind: float(np.mean(found)) for kind, found in hits.items()}
    copy = [hit for kind in pretrain_corpus.COPY_KINDS for hit in hits.get(kind, [])]
    result["copy"] = float(np.mean(copy)) if copy else float("nan")
    return result


def probe_table(rows: dict[str, dict[str, float]]) -> str:
    kinds = [*pretrain_corpus.KINDS, "copy"]
    lines = [f"{'model':<12}" + "".join(f"{kind:>12}" for kind in kinds)]
    for name, result in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{result.get(kind, 0.0):>12.3f}" for kind in kinds))
    return "\n".join(lines)


# --- the whole build ---------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(args: argparse.Namespace) -> dict:
    """corpus -> tokenizer -> pretraining -> export -> probe -> build.json; returns build.json."""
    started = time.perf_counter()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="tiny_base_") as scratch:
        scratch = Path(scratch)
        corpus = build_corpus(
            scratch / "corpus.jsonl", args.documents, args.seed, answers_only=args.loss == "answers"
        )
        build_tokenizer(
            scratch / "corpus.jsonl",
            scratch / "tokenizer",
            vocab_size=args.vocab_size,
            pattern=args.pattern,
            tasks=args.tokenizer_tasks,
            seed=args.seed,
        )
        config, summary = pretrain(
            scratch / "corpus.jsonl", scratch / "tokenizer", scratch / "run", args
        )
        ship(scratch / "run", scratch / "tokenizer", out)
    pretrain_s = time.perf_counter() - started

    tokenizer = load_tokenizer(out)
    model, params = load_hf_checkpoint(out)
    documents = pretrain_corpus.generate_documents(args.probe_documents, args.seed, split="probe")
    rows = {}
    if documents:  # the random init first: what pretraining adds
        random_params = init_params(model, jax.random.key(args.seed))
        rows["random init"] = probe(random_params, model, tokenizer, documents)
        rows["base"] = probe(params, model, tokenizer, documents)
    record = {
        "command": " ".join(["python", "experiments/build_tiny_base.py", *args.argv]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "lr": config.train.lr,
        "warmup_steps": config.train.warmup_steps,
        "corpus": corpus,
        "tokenizer": {
            "pattern": args.pattern,
            "vocab_size": tokenizer.vocab_size,
            "tasks": args.tokenizer_tasks,
        },
        "sha256": {name: sha256(out / name) for name in SHIPPED},
        "final_loss": summary.get("loss"),
        "git_commit": _git_commit(),
        "pretrain_wall_s": round(pretrain_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "probe": {"documents": len(documents), **rows},
    }
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default="runs/tiny_base")
    parser.add_argument("--documents", type=int, default=60_000, help="training documents")
    parser.add_argument(
        "--loss",
        choices=("answers", "all"),
        default="answers",
        help="train each document's answer only (the default), or every token",
    )
    parser.add_argument("--probe-documents", type=int, default=240, help="held out, all kinds")
    parser.add_argument("--pattern", default="qwen", help="tokenizer pre-tokenizer pattern")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--tokenizer-tasks", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny_pretrain's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: tiny_pretrain's")
    parser.add_argument("--lr", type=float, default=None, help="default: tiny_pretrain's")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    record = build(args)
    rows = {k: v for k, v in record["probe"].items() if k != "documents"}
    if rows:
        print(probe_table(rows))
    print(f"final loss {record['final_loss']:.4f}, wall {record['wall_s']:.0f} s -> {args.out}")
    print(
        json.dumps(
            {
                "final_loss": record["final_loss"],
                "wall_s": record["wall_s"],
                "probe": record["probe"],
            }
        )
    )


if __name__ == "__main__":
    main()
