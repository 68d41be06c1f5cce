"""The simulator's data and fine-tuning from the command line, for a real simulator at scale.

    python tools/simulator.py collect policy_model=NAME_OR_DIR data=train.jsonl corpus=corpus.jsonl out=rows.jsonl n=N
    python tools/simulator.py train data=rows.jsonl model=Qwen/Qwen2.5-7B out=my_simulator preset=paper [steps=1000 batch_size=2 lr=1e-6 seed=0]

rows.jsonl (what collect writes) holds one JSON object a line:
    {"query": "...", "question": "...", "answer": "...", "label": "useful" | "noisy",
     "documents": ["first document", "second document", ...] | "Doc 1: ... Doc 2: ...",
     "evidence": ["...", ...]}   # optional: facts shown to the simulator (`{evidence}` in the template)
The simulator learns to write the documents after the control prompt it will be served with,
`sim_template_{sim_style}` with `topk` as k, from the config chosen as for zerosearch.py: config.yaml
< preset=NAME < --config FILE < any other config key=value. preset=paper gives the paper's prompt
and k=5; without it the prompt is the tiny world's, k=3. data, steps, batch_size, lr and seed are
the fine-tuning's own, not the RL config's. The loss is on the documents only. Defaults are the
paper's SFT (1000 steps, batch 2, lr 1e-6); it runs in one process, on the GPU if there is one.
"""
import contextlib
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import config
import engines
import sim
import world
import zerosearch


COLLECT_DEFAULTS = dict(out="rows.jsonl", n=20000)  # the paper fine-tuned on about 20k rows


SIM_ROW_KEYS = ("query", "question", "answer", "documents", "label")
TRAIN_DEFAULTS = dict(data=None, model=None, out="simulator", steps=1000, batch_size=2, lr=1e-6, seed=0)  # the paper's SFT


def read_simulator_rows(path):
    """Simulation fine-tuning rows from a JSONL file (the form is in the module docstring); a row
    a user got wrong is one clear line naming it."""
    if not os.path.exists(path):
        raise SystemExit(f"error: data file not found: {path}")
    rows = []
    for n, row in world.read_jsonl(path):
        docs = row.get("documents")  # a list of strings, or one "Doc 1: ... Doc 2: ..." string
        docs = sim.parse_docs(docs, 20) if isinstance(docs, str) else docs if isinstance(docs, list) else []
        texts = [row.get(k) for k in ("query", "question", "answer")] + (docs or [None])  # each a non-empty string
        if row.get("label") not in ("useful", "noisy") or not all(isinstance(t, str) and t.strip() for t in texts):
            raise SystemExit(f"error: {path} line {n}: a row needs {', '.join(SIM_ROW_KEYS)}: query, question and "
                             "answer as non-empty strings, label useful or noisy, and documents as a list of "
                             "strings or one 'Doc 1: ... Doc 2: ...' string")
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path} holds no rows")
    return rows


def arguments(command, argv, defaults, numbers):
    """-> (the command's own arguments over `defaults`, the config the others choose, as for zerosearch.py). Each
    key of `numbers`, (kind, low, what), must be a `kind` above `low`: else one line says to set it to `what`."""
    args, config_args = config.own_arguments(argv, defaults)
    cfg = config.load_config(config_args)
    for key, (kind, low, what) in numbers.items():
        text = args[key]
        with contextlib.suppress(ValueError):
            args[key] = kind(text)
        if not (isinstance(args[key], kind) and args[key] > low):
            raise SystemExit(f"error: simulator.py {command}: {key}={text}: set {key} to {what} (default {defaults[key]})")
    return args, cfg


def load_model(name, key):
    """-> (tokenizer, causal LM) of a Hugging Face name or a directory, the model on the GPU if there is one;
    one line where either cannot be loaded."""
    try:
        tok, model = world.load_tokenizer(name), AutoModelForCausalLM.from_pretrained(name)
    except OSError as e:
        raise SystemExit(f"error: cannot load {key} {name!r}: {str(e).splitlines()[0]}")
    return tok, model.to("cuda" if torch.cuda.is_available() else "cpu")


def train_main(argv):
    """`python tools/simulator.py train data=rows.jsonl model=NAME_OR_DIR [out=DIR steps=N batch_size=N lr=X seed=N]
    [preset=NAME --config FILE key=value ...]`: the arguments of TRAIN_DEFAULTS are the fine-tuning's
    own; the rest choose the config (its `topk` and control prompt) exactly as for zerosearch.py."""
    positive = (int, 0, "a positive integer")
    args, cfg = arguments("train", argv, TRAIN_DEFAULTS, {"steps": positive, "batch_size": positive,
                          "lr": (float, 0, "a positive number"), "seed": (int, float("-inf"), "an integer")})
    if not args["data"] or not args["model"]:
        raise SystemExit("error: simulator.py train needs data=rows.jsonl and model=... (a Hugging Face name, or a "
                         "directory holding a model and its tokenizer)")
    rows = read_simulator_rows(args["data"])
    config.check_folder(args["out"], "out", keep=False)
    tok, model = load_model(args["model"], "model")
    if tok.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args['model']!r} has no EOS token to end the documents with")
    if tok.pad_token is None:  # padding is masked out of the loss; any id will do
        tok.pad_token = tok.eos_token
    torch.manual_seed(args["seed"])
    loss = sim.train_simulator(model, tok, rows, cfg, args["steps"], args["batch_size"], args["lr"], args["seed"])
    model.save_pretrained(args["out"])
    tok.save_pretrained(args["out"])
    print(f"simulator fine-tuned on {len(rows)} rows ({args['steps']} steps, last loss {loss:.3f}), saved to {args['out']}")


def collect_main(argv):
    """`python tools/simulator.py collect policy_model=NAME_OR_DIR data=train.jsonl corpus=corpus.jsonl out=rows.jsonl
    n=N [any config key=value]` (or eval_backend=retriever retriever_url=... for a served engine; with
    data=world, the embedded world's train questions and BM25)."""
    args, cfg = arguments("collect", argv, COLLECT_DEFAULTS, {"n": (int, 1, "the number of rows wanted, 2 or more")})
    if not cfg["policy_model"]:
        raise SystemExit("error: simulator.py collect needs policy_model=... (the paper used an instruct model, prompted; "
                         "on the embedded world, its warm-up policy out_dir/build/<hash>/warmup)")
    config.check_folder(os.path.dirname(os.path.abspath(args["out"])), "out")
    if cfg["data"] == "world":
        w = world.world_of(cfg)
        questions, docs = w.train, w.docs
    else:
        questions = world.load_questions(cfg["data"])
        docs = world.load_corpus(cfg["corpus"]) if cfg["eval_backend"] == "real" and cfg["corpus"] else None
    if docs is None and cfg["eval_backend"] != "retriever":
        raise SystemExit("error: simulator.py collect searches a real engine: set corpus=corpus.jsonl, or "
                         "eval_backend=retriever retriever_url=... (a served one)")
    tok, model = load_model(cfg["policy_model"], "policy_model")  # from_pretrained leaves it in eval mode
    engine = (engines.RetrieverEngine(cfg, tok) if cfg["eval_backend"] == "retriever" else
              engines.RealEngine(engines.Retriever(docs), cfg, tok))
    rows, n_useful, n_noisy = zerosearch.collect(model, tok, questions, engine, cfg, args["n"], cfg["seed"])
    with open(args["out"], "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    useful = sum(row["label"] == "useful" for row in rows)
    print(f"{len(rows)} rows ({useful} useful, {len(rows) - useful} noisy; collected {n_useful} useful and "
          f"{n_noisy} noisy) written to {args['out']}")


def main(argv):
    commands = {"train": train_main, "collect": collect_main}
    if not argv or argv[0] not in commands:
        raise SystemExit("usage: python tools/simulator.py train data=rows.jsonl model=NAME_OR_DIR [out=DIR steps=N batch_size=N "
                         "lr=X seed=N] [config key=value ...]\n   or: python tools/simulator.py collect policy_model=NAME_OR_DIR "
                         "data=train.jsonl corpus=corpus.jsonl out=rows.jsonl n=N [config key=value ...]")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
