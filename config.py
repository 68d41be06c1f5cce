"""The config: config.yaml < presets/<preset>.yaml < --config FILE < key=value arguments, and the
checks that give a bad value one clear line. A leaf: zerosearch.py, sim.py and bench.py read it."""
import difflib
import os

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = os.path.join(HERE, "config.yaml")

CHOICES = {"algo": ("ppo", "grpo", "reinforce", "reinforce++"), "reward": ("f1", "em"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("float32", "bfloat16"), "search_backend": ("sim", "real", "http", "retriever"),
           "eval_backend": ("real", "retriever"),
           "sim_style": ("finetuned", "prompted"), "sharding": ("ddp", "fsdp"),
           "loss_agg_mode": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
           "sim_batching": ("auto", "list", "single"), "kl_type": ("k1", "abs", "k2", "k3"),
           "kl_in": ("auto", "reward", "loss"),
           "mode": ("train", "eval", "ask"), "ask_engine": (None, "sim", "real", "retriever", "http")}
AT_LEAST_ONE = ["steps", "batch_size", "n_samples", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                "topk", "doc_tokens", "max_turn_tokens", "max_response_tokens", "sim_max_tokens",
                "eval_size", "threads", "sim_retries", "retriever_retries", "max_prompt_tokens"]
AT_LEAST_ZERO = ["max_turns", "warmup_steps", "sim_sft_steps", "critic_warmup", "lr_warmup_ratio",
                 "critic_lr_warmup_ratio"]
POSITIVE = ["temperature", "sim_timeout", "retriever_timeout", "dist_timeout", "actor_lr", "critic_lr"]  # > 0


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
    overrides = {k.lstrip("-"): parse_value(v) for k, v in args}
    preset = overrides.get("preset", cfg["preset"])
    while preset and os.path.join(HERE, "presets", f"{preset}.yaml") not in files:  # and the preset it starts from
        files.insert(0, os.path.join(HERE, "presets", f"{preset}.yaml"))
        preset = os.path.isfile(files[0]) and read_yaml(files[0]).get("preset")
    for path in files:
        if not path or not os.path.isfile(path):
            raise SystemExit(f"error: config file not found: {path} "
                             f"(presets are in {os.path.join(HERE, 'presets')})")
        merge(cfg, read_yaml(path), path)
    merge(cfg, overrides, "the command line")
    return check_values(cfg)


def read_yaml(path):
    """A YAML file that must hold a mapping of keys (or nothing); one clear line if it does not."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" line {where.line + 1}" if where else ""
        raise SystemExit(f"error: {path}{at}: not valid YAML ({str(e).splitlines()[0]}); write one key: value a line")
    if data is not None and not isinstance(data, dict):
        raise SystemExit(f"error: {path}: holds a {type(data).__name__}, not key: value lines")
    return data or {}


def check_values(cfg):
    """Each value of the right kind, one clear line if not: a number where config.yaml has a number
    (1e3 is taken as 1000 where a whole number is due), a choice from CHOICES, counts of at least 1."""
    defaults = read_yaml(DEFAULTS)
    for key, default in defaults.items():
        value = cfg[key]
        if key in ("eval_size", "dual_clip") and value is None:  # all questions; no dual clip
            continue
        if isinstance(default, bool) and not isinstance(value, bool) and key != "resume":  # resume may name a folder
            raise SystemExit(f"error: {key} must be true or false, got {value!r}")
        if type(default) is int and isinstance(value, float) and value.is_integer():
            cfg[key] = value = int(value)
        if type(default) in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or type(default) is int and not isinstance(value, int)):
            whole = "whole " if type(default) is int else ""
            raise SystemExit(f"error: {key} must be a {whole}number, got {value!r}")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    for key in AT_LEAST_ONE:
        if cfg[key] is not None and cfg[key] < 1:
            raise SystemExit(f"error: {key} must be at least 1, got {cfg[key]}")
    for key in AT_LEAST_ZERO:
        if cfg[key] < 0:
            raise SystemExit(f"error: {key} must be 0 or more, got {cfg[key]}")
    for key in POSITIVE:
        if not cfg[key] > 0:
            hint = " (rollouts sample; evaluation is greedy anyway)" if key == "temperature" else ""
            raise SystemExit(f"error: {key} must be greater than 0{hint}, got {cfg[key]}")
    if cfg["mode"] == "train" and cfg["data"] == "world" and cfg["eval_data"] != "world":
        raise SystemExit("error: eval_data names files but data=world: set data= to a train file too, "
                         "or leave eval_data=world")
    if not isinstance(cfg["out_dir"], str) or not cfg["out_dir"].strip():
        raise SystemExit("error: out_dir is empty; set out_dir=a folder to write the run to")
    if cfg["noise_prob"] is not None and not (isinstance(cfg["noise_prob"], (int, float)) and 0 <= cfg["noise_prob"] <= 1):
        raise SystemExit(f"error: noise_prob is a probability: null or between 0 and 1, got {cfg['noise_prob']!r}")
    if cfg["mode"] != "train" and not cfg["policy_model"] and cfg["data"] != "world":
        raise SystemExit(f"error: mode={cfg['mode']} needs policy_model=... (a trained policy's folder or a hub name)")
    if cfg["rl_seed"] is not None and (isinstance(cfg["rl_seed"], bool) or not isinstance(cfg["rl_seed"], int)):
        raise SystemExit(f"error: rl_seed must be null (the same as seed) or a whole number, got {cfg['rl_seed']!r}")
    if cfg["dual_clip"] is not None and not cfg["dual_clip"] > 1:
        raise SystemExit(f"error: dual_clip (c of the cap -A c for A < 0) must be above 1, or null for none; "
                         f"got {cfg['dual_clip']}")
    if not 0 <= cfg["p_start"] <= 1 or not 0 <= cfg["p_end"] <= 1:
        raise SystemExit("error: p_start and p_end are probabilities: each must be between 0 and 1")
    if cfg["curriculum_base"] <= 0 or cfg["curriculum_base"] == 1:
        raise SystemExit("error: curriculum_base (b in (b^(i/m) - 1)/(b - 1)) must be positive and not 1, "
                         f"got {cfg['curriculum_base']}")
    return cfg


def parse_value(text):
    """A command-line value as YAML reads it, except that 1e-4 is a number (YAML 1.1 reads a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
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
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        if made and not keep:
            os.rmdir(path)
    except OSError as e:
        raise SystemExit(f"error: {key}={path} cannot hold files ({e.strerror or e}); set {key}= to a folder you can write")
