"""The config: config.yaml < presets/<preset>.yaml < --config FILE < key=value arguments, and the
checks that give a bad value one clear line. A leaf: zerosearch.py, sim.py and bench.py read it."""
import difflib
import fcntl
import math
import os
import string
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = os.path.join(HERE, "config.yaml")

CHOICES = {"algo": ("ppo", "grpo", "reinforce", "reinforce++"), "reward": ("f1", "em"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("float32", "bfloat16"), "search_backend": ("sim", "real", "http", "retriever"),
           "eval_backend": ("real", "retriever"), "sim_style": ("finetuned", "prompted"), "sharding": ("ddp", "fsdp"),
           "loss_agg_mode": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
           "sim_batching": ("auto", "list", "single"), "kl_type": ("k1", "abs", "k2", "k3"),
           "kl_in": ("auto", "reward", "loss"), "mode": ("train", "eval", "ask"),
           "ask_engine": (None, "sim", "real", "retriever", "http")}
AT_LEAST_ONE = ["steps", "batch_size", "n_samples", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                "topk", "doc_tokens", "max_turn_tokens", "max_response_tokens", "sim_max_tokens",
                "eval_size", "threads", "sim_retries", "retriever_retries", "max_prompt_tokens", "save_every", "keep_last"]
AT_LEAST_ZERO = ["sim_temperature", "max_turns", "pretrain_steps", "warmup_steps", "sim_sft_steps", "critic_warmup",
                 "lr_warmup_ratio", "critic_lr_warmup_ratio"]
TEXT_OR_NULL = ["question", "policy_model", "sim_model", "corpus", "sim_served_model"]  # null by default, text when set
TEMPLATES = {"prompt_template": ("question", {"question"}), "direct_template": ("question", {"question"}), **dict.fromkeys(
    ["sim_template_finetuned", "sim_template_prompted", "sim_template_prompted_noisy"],  # the fields sim.sim_prompt fills in
    ("query", {"k", "kind", "Kind", "question", "answer", "evidence", "query"}))}  # template: (the field it needs, those it may use)
POSITIVE = ["pretrain_lr", "temperature", "sim_timeout", "retriever_timeout", "dist_timeout", "actor_lr", "critic_lr"]  # > 0


def load_config(argv):
    """config.yaml < presets/<preset>.yaml < --config FILE < key=value arguments -> a flat dict."""
    cfg = read_yaml(DEFAULTS)
    args, files = [], []
    it = iter(argv)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            files.append(a.split("=", 1)[1] if "=" in a else next(it, None))
        elif "=" in a:
            args.append(a.split("=", 1))
        else:
            raise SystemExit(f"error: argument {a!r} is not key=value (e.g. steps=10) or --config FILE")
    if len({k for k, _ in args}) < len(args):
        raise SystemExit(f"error: {', '.join(sorted({k for k, _ in args if [a for a, _ in args].count(k) > 1}))} "
                         "given more than once on the command line; give each key once")
    overrides = {k.lstrip("-"): parse_value(v) for k, v in args}
    preset = overrides.get("preset", cfg["preset"])
    while preset and os.path.join(HERE, "presets", f"{preset}.yaml") not in files:  # and the preset it starts from
        files.insert(0, os.path.join(HERE, "presets", f"{preset}.yaml"))
        preset = os.path.isfile(files[0]) and read_yaml(files[0]).get("preset")
    for path in files:
        if not path or not os.path.isfile(path):
            raise SystemExit(f"error: config file not found: {path} (presets are in {os.path.join(HERE, 'presets')})")
        merge(cfg, read_yaml(path), path)
    merge(cfg, overrides, "the command line")
    return check_values(cfg)


def read_yaml(path):
    """A YAML file that must hold a mapping of keys (or nothing); one clear line if it does not."""
    if os.path.getsize(path) > 1_000_000:
        raise SystemExit(f"error: {path} is {os.path.getsize(path)} bytes; a config file holds key: value lines (1 MB at most)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        at = f" line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise SystemExit(f"error: {path}{at}: not valid YAML ({str(e).splitlines()[0]}); write one key: value a line")
    if data is not None and not isinstance(data, dict):
        raise SystemExit(f"error: {path}: holds a {type(data).__name__}, not key: value lines")
    return data or {}


def check_values(cfg):
    """Each value of the right kind, one clear line if not: a number where config.yaml has a number
    (1e3 is taken as 1000 where a whole number is due), a choice from CHOICES, counts of at least 1."""
    defaults = read_yaml(DEFAULTS)
    for key, value in cfg.items():  # never printed whole: a YAML alias bomb is small until it is
        default = defaults[key]  # cfg has config.yaml's keys alone: merge takes no other
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise SystemExit(f"error: {key} must be one value, but YAML read a {type(value).__name__}: quote text with ': ' or '{{'")
        if isinstance(value, str) and len(value) > 100_000:  # a prompt template, a path, a question: never megabytes
            raise SystemExit(f"error: {key} is {len(value)} characters long; a text value holds at most 100000")
        text = key in TEXT_OR_NULL and value is not None or isinstance(default, str) and key not in CHOICES
        if text and not isinstance(value, str):
            raise SystemExit(f"error: {key} is empty; set {key}=..., or leave it out for config.yaml's value" if value is None else
                             f"error: {key} must be text, got {value!r}: quote it, e.g. {key}='\"{value}\"' on the command line")
        if key in ("eval_size", "dual_clip") and value is None:  # all questions; no dual clip
            continue
        if isinstance(default, bool) and not isinstance(value, bool) and key != "resume":  # resume may name a folder
            raise SystemExit(f"error: {key} must be true or false, got {value!r}")
        if type(default) is int and isinstance(value, float) and value.is_integer():
            cfg[key] = value = int(value)
        if type(default) in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or type(default) is int and not isinstance(value, int) or not math.isfinite(value)):
            raise SystemExit(f"error: {key} must be a {'whole ' if type(default) is int else ''}number, got {value!r}")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {', '.join('null' if a is None else a for a in allowed)}; "
                             f"got {cfg[key]!r}")
    for keys, too_low, bound in ((AT_LEAST_ONE, lambda v: v < 1, "at least 1"),
                                 (AT_LEAST_ZERO, lambda v: v < 0, "0 or more"),
                                 (POSITIVE, lambda v: v <= 0, "greater than 0")):  # numbers by now; eval_size may be null
        for key in keys:
            if cfg[key] is not None and too_low(cfg[key]):
                hint = " (rollouts sample; evaluation is greedy anyway)" if key == "temperature" else ""
                raise SystemExit(f"error: {key} must be {bound}{hint}, got {cfg[key]}")
    problems = [  # (bad, what to say): tests safe on any value that passed the checks above; the first bad one stops
        (cfg["mode"] == "train" and cfg["data"] == "world" and cfg["eval_data"] != "world",
         "eval_data names files but data=world: set data= to a train file too, or leave eval_data=world"),
        (not cfg["out_dir"].strip(), "out_dir is empty; set out_dir=a folder to write the run to"),
        (cfg["noise_prob"] is not None and not (isinstance(cfg["noise_prob"], (int, float)) and 0 <= cfg["noise_prob"] <= 1),
         f"noise_prob is a probability: null or between 0 and 1, got {cfg['noise_prob']!r}"),
        (cfg["mode"] != "train" and not cfg["policy_model"] and cfg["data"] != "world",
         f"mode={cfg['mode']} needs policy_model=... (a trained policy's folder or a hub name)"),
        (cfg["rl_seed"] is not None and (isinstance(cfg["rl_seed"], bool) or not isinstance(cfg["rl_seed"], int)),
         f"rl_seed must be null (the same as seed) or a whole number, got {cfg['rl_seed']!r}"),
        (cfg["dual_clip"] is not None and not cfg["dual_clip"] > 1,
         f"dual_clip (c of the cap -A c for A < 0) must be above 1, or null for none; got {cfg['dual_clip']}"),
        (not 0 <= cfg["p_start"] <= 1 or not 0 <= cfg["p_end"] <= 1,
         "p_start and p_end are probabilities: each must be between 0 and 1"),
        (not 0 < cfg["top_p"] <= 1, f"top_p must be greater than 0 and at most 1 (1: no nucleus cut), got {cfg['top_p']}"),
        (not (1 <= cfg["world_phrasings"] <= 3 and 0 <= cfg["world_passages"] <= 6),
         "world_phrasings must be 1 to 3 and world_passages 0 to 6 (the phrasings and passages world.py has); "
         f"got {cfg['world_phrasings']} and {cfg['world_passages']}"),
        (not 7 <= cfg["world_companies"] <= min(cfg["world_persons"], 1500) or cfg["world_persons"] > 6400,
         "the world needs 7 to 1500 companies (a test set holds out 15% of them), no more than world_persons, and at most "
         f"6400 persons; got world_persons={cfg['world_persons']} world_companies={cfg['world_companies']}"),
        (cfg["topk"] * cfg["doc_tokens"] > cfg["max_response_tokens"],  # one search's documents must fit the response
         f"topk={cfg['topk']} documents of doc_tokens={cfg['doc_tokens']} tokens do not fit in max_response_tokens="
         f"{cfg['max_response_tokens']}; lower topk or doc_tokens, or raise max_response_tokens"),
        (cfg["curriculum_base"] <= 0 or cfg["curriculum_base"] == 1,
         f"curriculum_base (b in (b^(i/m) - 1)/(b - 1)) must be positive and not 1, got {cfg['curriculum_base']}")]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")
    for key, (needed, allowed) in TEMPLATES.items():
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(cfg[key]) if name is not None}
        except ValueError as e:  # a lone { or }
            raise SystemExit(f"error: {key} is not a template ({e}); write a brace that is text as {{{{ or }}}}")
        if fields - allowed or needed not in fields:
            raise SystemExit(f"error: {key} must hold {{{needed}}} and no field but {sorted(allowed)}; it has {sorted(fields)}")
    return cfg


def parse_value(text):
    """A command-line value as YAML reads it, except that 1e-4 is a number (YAML 1.1 reads a string)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def merge(cfg, new, source):
    """cfg updated with `new`; a key config.yaml does not have is an error that suggests the nearest."""
    for k, v in new.items():
        if k not in cfg:
            near = difflib.get_close_matches(k, cfg, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SystemExit(f"error: unknown config key {k!r} in {source}{hint}")
        cfg[k] = v


def check_folder(path, key, keep=True):
    """`path` is, or can be made, a folder that takes files: checked before any work, with one line.
    keep=False removes the folder again if this check made it."""
    try:
        made = not os.path.exists(path)
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a file made there, and gone once closed
        if made and not keep:
            os.rmdir(path)
    except OSError as e:
        raise SystemExit(f"error: {key}={path} cannot hold files ({e.strerror or e}); set {key}= to a folder you can write")


def own_arguments(argv, defaults):
    """-> (the command's own key=value arguments over `defaults`, the rest: config arguments)."""
    args, config_args = dict(defaults), []
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if eq and key in args:
            args[key] = value
        else:
            config_args += [arg, next(it, "")] if arg == "--config" else [arg]
    return args, config_args


def lock_folder(path):
    """Hold path/.lock for as long as the returned file is open: a second run into the same folder stops
    with one line. The OS lets go of the lock when this process ends, however it ends."""
    lock = open(os.path.join(path, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: by another process, or a file system without locks
        raise SystemExit(f"error: out_dir={path} is in use by another run (it holds .lock there); wait for it, or set another out_dir")
    return lock
