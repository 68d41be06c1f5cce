"""Processes, sharding and checkpoints: what zerosearch.py needs to run on N processes, to stop and
to resume. Every torch.distributed call of the project is in this file: the models, the sampler,
the simulator and the PPO maths never make one. The loop hands them `ctx.all_sum` / `ctx.all_mean`
where a statistic must be global, and the models are wrapped here, from outside (as torchtitan's
parallelize.py). With one process there is no process group, every collective is a no-op and no
model is wrapped.

Sharding (config `sharding`, with torchrun):
  ddp   DistributedDataParallel over the actor and the critic: full copies on every process, gradients
        averaged. The frozen reference is not wrapped: it has no gradients to average.
  fsdp  FSDP2: `fully_shard` on every decoder layer, then on the whole model, so a process holds 1/N of
        the weights, gradients and Adam states; the reference too, its shards on the CPU with
        ref_offload. A sharded forward all-gathers each layer's weights, in fp32: the weights are fp32
        and dtype=bfloat16 computes under autocast (ppo.autocast); FSDP2's MixedPrecisionPolicy
        (param_dtype=bf16) would halve that traffic and is not used here.

Rollouts: the sampler (sim.sample) calls the Hugging Face model directly, a data-dependent number of
times (a batch stops when its last row stops), so processes make different numbers of calls. With ddp
it runs on the actor's own replicated model and needs no communication. With fsdp a sharded forward
is a collective that every process must call equally often, so the sampler runs on a plain, full copy
of the policy (fp32, as the shards), refreshed from them once per step (an all-gather of each weight in turn, made by every
process alike) -- as veRL copies the trained weights into vLLM.

Checkpoints: out_dir/checkpoints/<run>/step_000020/ holds the models and optimizers' tensors as
safetensors (written with torch.distributed.checkpoint's Hugging Face storage: each process writes its
own shards, so out_dir must be on a file system every node sees), each process's torch RNG state in
rng.safetensors, and state.json (step, schedulers, kl_coef, engine counters, the optimizers' settings,
each process's Python RNG state). Nothing in a checkpoint is a pickle, so loading one runs no code.
It is written as step_000020.tmp and renamed once every process has written its part, so a folder
without the .tmp suffix is always complete.
"""
import contextlib
import datetime
import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers.modeling_layers import GradientCheckpointingLayer


# ----------------------------------------------------------------------------- processes
@dataclass
class Ctx:
    """Who this process is. With one process every collective is a no-op."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0

    def all_sum(self, t):
        """t summed over processes (t itself with one process)."""
        if self.world == 1:
            return t
        on_device = t.to(self.device)  # NCCL reduces CUDA tensors only; gloo reduces t in place
        dist.all_reduce(on_device)
        return on_device.to(t.device)

    def all_mean(self, t):
        return self.all_sum(t) / self.world if self.world > 1 else t

    def sum_stats(self, stats):
        """{name: number}, the same names on every process -> their sums over processes."""
        if self.world == 1:
            return dict(stats)
        return dict(zip(stats, self.all_sum(torch.tensor(list(stats.values()), dtype=torch.float64)).tolist()))

    def mean_stats(self, stats):
        """{name: float}, the same names on every process -> their means over processes."""
        return stats if self.world == 1 else {k: v / self.world for k, v in self.sum_stats(stats).items()}

    def any(self, flag):
        """True on every process if `flag` is true on any."""
        return self.all_sum(torch.tensor([float(flag)])).item() > 0

    def gather(self, obj):
        """[obj of process 0, obj of process 1, ...] on every process."""
        out = [obj] * self.world  # with several processes all_gather_object fills each place with its obj
        if self.world > 1:
            dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def print0(self, *args):
        if self.master:
            print(*args, flush=True)


def init_processes(cfg):
    """Process group from the torchrun environment: NCCL on CUDA, gloo on CPU. A collective that waits
    longer than dist_timeout seconds (a process died or hangs) raises, so the job stops instead of hanging."""
    torch.set_num_threads(cfg["threads"])
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: device=cuda but this machine has no CUDA GPU that torch can use; set device=auto or cpu")
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Ctx(device="cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg["dist_timeout"]))
    return Ctx(dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu")


def close(ctx):
    if ctx.world > 1:
        dist.destroy_process_group()


def check_config(cfg, ctx, runs):
    """The scale keys, checked at the edge with one clear line each."""
    for key in ("batch_size", "mini_batch_size"):
        if cfg[key] % ctx.world:
            raise SystemExit(f"error: {key}={cfg[key]} must be a multiple of the number of processes ({ctx.world})")
    resume = cfg["resume"]
    if isinstance(resume, str):
        if not os.path.isdir(resume):
            raise SystemExit(f"error: resume={resume}: no such checkpoint folder")
        if run_of(resume) not in runs:
            raise SystemExit(f"error: resume={resume}: a checkpoint lies in checkpoints/<run>/step_N, run one of {', '.join(runs)}")
    elif resume not in (True, False):
        raise SystemExit(f"error: resume must be true, false or a checkpoint folder, got {resume!r}")


# ----------------------------------------------------------------------------- sharding
def parallelize(model, cfg, ctx, frozen=False):
    """Wrap `model` for cfg["sharding"] (see the module docstring); with one process it is returned as is.
    grad_checkpointing recomputes each decoder layer's activations in the backward pass (Hugging Face's
    own checkpointing, which acts in train mode only: Qwen2 has no active dropout, so train mode changes
    nothing else)."""
    if cfg["grad_checkpointing"] and not frozen:
        # non-reentrant torch.utils.checkpoint per decoder layer; ppo.Actor holds its HF model as .lm, the critic is one
        getattr(model, "lm", model).activation_checkpointing_enable()
        model.train()
    if ctx.world == 1:
        return model
    if cfg["sharding"] == "ddp":  # no forward_sync_buffers: the only buffers are the fixed rotary frequencies
        device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
        return model if frozen else DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    # FSDP2 warns that the critic's output is a view, in case the caller writes into it: ppo.token_values never does
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(torch.device(ctx.device).type, (ctx.world,))
    offload = CPUOffloadPolicy(pin_memory=ctx.device != "cpu") if frozen and cfg["ref_offload"] else OffloadPolicy()
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:  # the decoder layers
        fully_shard(layer, mesh=mesh, offload_policy=offload)
    fully_shard(model, mesh=mesh, offload_policy=offload)  # the root: embeddings, final norm, heads
    return model


def sampler_model(actor, copy):
    """The policy as a plain Hugging Face model with full weights, for the sampler: the actor's own
    model when it is replicated (copy is None), else `copy` (a plain ppo.Actor) loaded with the
    weights all-gathered from the shards, one weight at a time, so no second full copy exists at once."""
    if copy is None:
        return getattr(actor, "module", actor).lm  # DistributedDataParallel keeps the model as .module
    with torch.no_grad():
        for name, weight in actor.named_parameters():  # the same order on every process: each gather is a collective
            copy.get_parameter(name).copy_(weight.full_tensor())
    return copy.lm


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(run_dir):
    """The complete checkpoints of a run, oldest first."""
    names = sorted(d for d in os.listdir(run_dir) if re.fullmatch(r"step_\d+", d)) if os.path.isdir(run_dir) else []
    return [os.path.join(run_dir, d) for d in names]


def run_of(path):
    """The run a checkpoint belongs to: the name of the folder it lies in."""
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def checkpoint_to_resume(resume, run_dir):
    """resume=false -> None; true -> this run's newest complete checkpoint, if any; a checkpoint folder
    -> that folder for its own run, and the newest complete checkpoint for any other run."""
    if isinstance(resume, str) and run_of(resume) == os.path.basename(run_dir):
        return resume
    return None if resume is False else (checkpoints(run_dir) or [None])[-1]


def drop_checkpoints_after(run_dir, step, ctx):
    """A resume from `step` abandons the run's later checkpoints: they would be resumed from next
    (resume=true takes the newest) and would throw the new ones out of keep_last."""
    if ctx.master:
        for path in checkpoints(run_dir):
            if int(path.rsplit("_", 1)[1]) > step:
                shutil.rmtree(path)
    ctx.barrier()


def start_over(run_dir, ctx):
    """A run that does not resume starts in an empty run folder. Checkpoints of an earlier run there
    are never removed silently: the job stops and says how to continue or start afresh."""
    if found := checkpoints(run_dir):
        raise SystemExit(f"error: {run_dir} holds checkpoints of an earlier run (newest {os.path.basename(found[-1])}): "
                         "continue it with resume=true, or set another out_dir (or delete that folder) to start over")
    if ctx.master and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # only unfinished saves (*.tmp) are left here
    ctx.barrier()


def _states(models, with_optimizer):
    """({name: model state, name/optimizer: optimizer state if with_optimizer(name, optimizer)}, in the
    form torch.distributed.checkpoint saves and loads for plain, DDP and FSDP models alike, with the
    optimizers' tensors only; {name/optimizer: its param_groups}: plain values, kept in state.json)."""
    states, groups = {}, {}
    for name, learner in models.items():
        states[name] = get_model_state_dict(learner.model)
        if with_optimizer(name, learner.optimizer):
            states[f"{name}/optimizer"] = get_optimizer_state_dict(learner.model, learner.optimizer)
            groups[f"{name}/optimizer"] = states[f"{name}/optimizer"].pop("param_groups")
    return states, groups


def _as_files(states):
    """`states` as safetensors files hold them: a tied weight (the output layer that is the input
    embedding) under its first name only, since safetensors stores a tensor once; loading it fills both."""
    def untied(state):
        first = {}
        for name, t in state.items():  # an empty shard has no address: keep it under its own name
            first.setdefault((t.to_local() if isinstance(t, DTensor) else t).data_ptr() or name, name)
        return {name: state[name] for name in first.values()}
    return {key: state if key.endswith("/optimizer") else untied(state) for key, state in states.items()}


def save_checkpoint(path, models, state, ctx, keep_last):
    """Write `models` ({name: ppo.Learner, with .model, .optimizer, .scheduler}) and `state` (a dict of
    plain values) to the folder `path`, atomically: everything goes to path.tmp, renamed to path once
    every process has written its part. Then all but the newest keep_last checkpoints of the run are
    removed. Non-finite weights are never saved: the job stops with one line and the last checkpoint
    stays the last good one."""
    finite = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                 for learner in models.values() for p in learner.model.parameters())
    if ctx.any(not finite):
        raise SystemExit(f"error: non-finite weights at step {state['step']}; not saving them "
                         f"(the last good checkpoint is kept in {os.path.dirname(path)})")
    tmp, run_dir = path + ".tmp", os.path.dirname(path)
    if ctx.master:
        for old in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
            if old.endswith(".tmp"):  # left by a save that was killed
                shutil.rmtree(os.path.join(run_dir, old))
        os.makedirs(tmp)
    ctx.barrier()
    # an optimizer that has not stepped yet (the actor during the critic warm-up) is left out: asking
    # for its state would make it take a zero step, which changes Adam's bias correction
    tensors, groups = _states(models, with_optimizer=lambda name, opt: bool(opt.state))
    # every process writes its own shards as safetensors; with one process there is no process group, by design
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # torch.distributed.checkpoint's warning
    with no_space_is_one_line(path, run_dir):
        dcp.save(_as_files(tensors), checkpoint_id=tmp, no_dist=ctx.world == 1,
                 storage_writer=dcp.HuggingFaceStorageWriter(tmp, save_distributed=True))
    cuda = torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None
    rng = ctx.gather((random.getstate(), torch.get_rng_state(), cuda))
    if ctx.master:
        state = dict(state, world=ctx.world, python_rng=[r[0] for r in rng], saved=sorted(tensors), param_groups=groups,
                     schedulers={name: learner.scheduler.state_dict() for name, learner in models.items()})
        rng_tensors = {f"{kind}.{rank}": t for rank, r in enumerate(rng) for kind, t in zip(("torch", "cuda"), r[1:]) if t is not None}
        with no_space_is_one_line(path, run_dir):
            save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
        shutil.rmtree(path, ignore_errors=True)  # a checkpoint of this step saved before
        os.replace(tmp, path)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    ctx.barrier()


def _unwrapped(e):
    """The exception itself, or for a CheckpointException (torch.distributed.checkpoint wraps each process's
    exception in one) the first process's own."""
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e


@contextlib.contextmanager
def no_space_is_one_line(path, run_dir):
    """A full disk while `path` is written: its partial folder is removed and the job stops with one
    line naming the last complete checkpoint (`last_good`), which is left as it was."""
    try:
        yield
    except (OSError, CheckpointException) as e:
        if getattr(_unwrapped(e), "errno", None) != errno.ENOSPC:
            raise
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        raise SystemExit(f"error: no space left on the device while writing {path}; {last_good(run_dir)}") from None


def load_checkpoint(path, models, ctx):
    """Load what save_checkpoint wrote into `models` (in place) -> the saved state dict. Only JSON and
    safetensors are read, so a checkpoint, whoever wrote it, runs no code (a pickle could). The RNG
    states are restored when the checkpoint was written by as many processes. A checkpoint that cannot
    be read stops the job with one line."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        reader = dcp.HuggingFaceStorageReader(path)
        reader.read_metadata()  # fails plainly, where dcp.load would first log tracebacks
        tensors, _ = _states(models, with_optimizer=lambda name, opt: f"{name}/optimizer" in state["saved"])
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no process group
        dcp.load(_as_files(tensors), checkpoint_id=path, storage_reader=reader, no_dist=ctx.world == 1)
        for name, learner in models.items():
            set_model_state_dict(learner.model, tensors[name])
            if f"{name}/optimizer" in tensors:
                optimizer_state = dict(tensors[f"{name}/optimizer"], param_groups=state["param_groups"][f"{name}/optimizer"])
                set_optimizer_state_dict(learner.model, learner.optimizer, optimizer_state)
            learner.scheduler.load_state_dict(state["schedulers"][name])
        rng = load_file(os.path.join(path, "rng.safetensors"))
    except (Exception, CheckpointException) as e:  # any failure to read it is the same news to the user
        e = _unwrapped(e)
        first = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"error: cannot load checkpoint {path}: {type(e).__name__}: {first} "
                         "(a checkpoint is read from its state.json and safetensors files alone)") from None
    if state["world"] == ctx.world:
        version, internal, gauss = state["python_rng"][ctx.rank]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(rng[f"torch.{ctx.rank}"])
        if f"cuda.{ctx.rank}" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng[f"cuda.{ctx.rank}"]))
    else:
        ctx.print0(f"note: {path} was written by {state['world']} processes, this run has {ctx.world}: "
                   "weights and optimizers are resharded, the RNG states are not restored")
    return state


# ----------------------------------------------------------------------------- Ctrl-C
def catch_ctrl_c():
    """Until `restore()`, Ctrl-C (SIGINT) or SIGTERM (a job scheduler taking the machine back) sets the
    returned flag and the step goes on; the loop then saves a checkpoint and exits. Alone, a second
    Ctrl-C stops the process at once, even inside one long torch op (Python runs its own handlers only
    between bytecodes, so a thread watches the signal wake-up pipe instead); under torchrun every
    SIGINT only sets the flag, since torchrun passes the terminal's Ctrl-C on to its workers a second
    time. Returns (flag: a one-element list, restore)."""
    flag, previous = [False], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    stop_watching = (lambda: None) if under_torchrun else watch_for_second_ctrl_c()

    def on_signal(signum, frame):
        if flag[0] and signum == signal.SIGINT and not under_torchrun:
            raise KeyboardInterrupt
        if not flag[0]:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)
        flag[0] = True

    for s in previous:
        signal.signal(s, on_signal)

    def restore():
        stop_watching()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return flag, restore


def watch_for_second_ctrl_c():
    """A thread that reads the number of every signal from CPython's wake-up pipe as it arrives and
    ends the process at the second SIGINT. Returns the function that stops it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch():
        seen = 0
        while data := os.read(read_end, 64):
            seen += data.count(signal.SIGINT)
            if seen >= 2:
                print("\nSIGINT again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(130)
        os.close(read_end)

    threading.Thread(target=watch, daemon=True).start()

    def stop():
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)  # the thread reads the end of the pipe and returns
    return stop


# ----------------------------------------------------------------------------- resume
def resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx):
    """-> (first step to run, kl_coef). With a checkpoint to resume from (cfg["resume"]), its step and
    kl_coef, after restoring the models, optimizers, schedulers, RNG states and the engine's counters,
    and its later checkpoints removed; else 0 and cfg["kl_coef"], after removing the run's old
    checkpoints. The metrics file keeps the other runs' rows and this run's before that step."""
    start, kl_coef, checkpoint = 0, cfg["kl_coef"], checkpoint_to_resume(cfg["resume"], run_dir)
    if checkpoint:
        state = load_checkpoint(checkpoint, models, ctx)
        check_resume(checkpoint, state, cfg)
        start, kl_coef = state["step"], state["kl_coef"]
        engine.stats.update({k: v if ctx.master else 0 for k, v in state["engine_stats"].items()})  # totals
        ctx.print0(f"{os.path.basename(run_dir)}: resuming from {checkpoint} (step {start} of {cfg['steps']})")
        drop_checkpoints_after(run_dir, start, ctx)
    else:
        start_over(run_dir, ctx)
    if ctx.master:
        name, lines = os.path.basename(run_dir), open(metrics_path).readlines() if os.path.exists(metrics_path) else []
        if lines and not lines[-1].endswith("\n"):  # a row is written with its newline at once: a kill cut this one short
            print(f"note: {metrics_path}: its last line was cut off by an interrupted write; it is dropped")
        rows = [json.loads(line) for line in lines if line.endswith("\n")]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("run") != name or r["step"] < start)
    return start, kl_coef


RESUME_KEYS = ("algo", "policy_model", "sim_model", "search_backend", "data")  # what a checkpoint continues


def check_resume(checkpoint, state, cfg):
    """A checkpoint continues the run that wrote it: the same RL algorithm, models, engine and data,
    and no more steps than this run has; anything else stops with one line."""
    for key, value in state.get("config", {}).items():
        if cfg[key] != value:
            raise SystemExit(f"error: {checkpoint} was written with {key}={value}, this run has {key}={cfg[key]}: "
                             f"set {key}={value} to continue it, or another out_dir to start a new run")
    if state["step"] > cfg["steps"]:
        raise SystemExit(f"error: {checkpoint} is at step {state['step']}, past steps={cfg['steps']}: "
                         f"set steps={state['step']} or more to continue it")


def save_step(run_dir, step, models, row, kl_coef, cfg, ctx):
    """A checkpoint after `step` (numbered step + 1, the next step to run)."""
    engine_totals = {k[len("sim/"):]: v for k, v in row.items() if k.startswith("sim/")}
    state = {"step": step + 1, "kl_coef": kl_coef, "noise_prob": row["noise_prob"], "engine_stats": engine_totals,
             "config": {k: cfg[k] for k in RESUME_KEYS}}
    save_checkpoint(os.path.join(run_dir, f"step_{step + 1:06d}"), models, state, ctx, cfg["keep_last"])


def last_good(run_dir):
    kept = checkpoints(run_dir)
    return f"the last good weights are in {kept[-1]}" if kept else "no checkpoint was written before it"
