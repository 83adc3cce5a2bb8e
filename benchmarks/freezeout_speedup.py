"""FreezeOut speed-up at equal epochs: regular pretraining vs FreezeOut schedules, for MAE and LocalMIM.

For every model (default: mae_vit_tiny_patch16 and localmim_vit_tiny_patch16 at 32 px, patch 8) and every
configuration (default: regular, FreezeOut linear t_0=0.5, FreezeOut cubic t_0=0.8) one `mimkit pretrain` run
(mimkit.tasks.pretrain.train, the real engine) is made in its own subprocess, with the same seed, data, epochs,
batch size and base lr. Reported per run: wall-clock per epoch, total time, peak memory, final loss and the
k-NN accuracy of the resulting encoder on the digits set (through `mimkit knn`, the command's own code).

How time is measured (a shared, noisy machine): all runs are alive at once and advance in lock-step, one
optimiser step each in turn (round robin, the starting run rotating every round); a run waits, blocked on a
pipe, while another computes. A run's time is the sum of its own step windows: from the moment it is let go to
the end of its optimiser step (data loading, forward, backward, update and the FreezeOut hook of the previous
step all inside; waiting outside), device-synchronised on CUDA. Other jobs on the machine therefore slow every
configuration alike, and the result is the ratio regular / FreezeOut within one invocation. (The engine's own
`epoch_time_s` in each run's metrics.jsonl includes the waiting and is not used.)

Peak memory (each run is its own process):
  * CPU:  peak resident set size (VmHWM; not ru_maxrss, which survives exec) minus the RSS at the first
          step (model, data and optimiser built): activations, gradients, AdamW state and allocator slack.
          A last-epoch peak is not measurable on CPU (memory torch frees stays resident in the C allocator),
          so it is left blank.
  * CUDA: torch.cuda.max_memory_allocated over the run, and over the last epoch (peak stats reset before it).
FreezeOut cannot lower the peak over a whole run: nothing is frozen during the first t_0 of training. What it
does lower is counted as well: the bytes autograd keeps for backward in one step, with the frozen-block count
of the run's first and of its last step (torch.autograd.graph.saved_tensors_hooks).

The saving, three ways:
  1. Reference estimate (FreezeOut paper / code, an ESTIMATE, not a measurement). Block i of L is trained for
     the fraction t_i of training and frozen for the remaining 1 - t_i. Treating the L blocks as the whole
     network with equal cost, the fraction of backward compute saved is
         b = sum_i (1 - t_i) / L,
     and with the reference's assumption that backward is about 2/3 of a training step (backward ~ 2 x forward,
     frozen layers still run forward), the saved fraction of training time is
         s_est = 2/3 * b,   speed-up_est = 1 / (1 - s_est).
     E.g. L = 12: linear t_0 = 0.5 gives b = 0.271, s_est = 0.181;
          cubic t_0 = 0.8 gives b = 0.282, s_est = 0.188.
  2. Counted FLOPs (deterministic, immune to the machine's noise): matmul / convolution / attention FLOPs of
     one forward + backward with k frozen blocks, counted by torch.utils.flop_counter for k = 0..L on this
     model, summed over the frozen-block counts each run actually trained with, step by step;
     s_flop = 1 - FLOPs(FreezeOut run) / FLOPs(regular run). This counts what the reference's estimate
     leaves out (the decoder / LocalMIM heads, which keep training; the patch embedding; the input gradient
     the first active block no longer computes); elementwise ops (norms, GELU, softmax, data loading, the
     optimiser) are not counted.
  3. Measured wall clock: s = 1 - time(FreezeOut) / time(regular), speed-up = time(regular) / time(FreezeOut).
     Beside it, the same ratio of the runs' CPU time (time.process_time over the same step windows): on a shared
     machine the wall clock of a step also holds the time other jobs had the cores, the CPU time much less so.

    # CPU, the figures in docs/freezeout.md (about 5 minutes on 2 shared cores)
    python benchmarks/freezeout_speedup.py --epochs 6 --batch_size 16 --num_images 256 \
        --model_kw embed_dim=96 num_heads=3 decoder_embed_dim=64 --output_dir runs/freezeout_bench
    # smallest smoke run
    python benchmarks/freezeout_speedup.py --models mae_vit_tiny_patch16 --configs regular linear:0.5 --epochs 1 \\
        --num_images 16 --batch_size 8 --model_kw depth=2 embed_dim=32 num_heads=2 decoder_embed_dim=32 \\
        decoder_depth=1 decoder_num_heads=2 --output_dir /tmp/fo_smoke
    # GPU, ViT-B LocalMIM (seed 002's model)
    python benchmarks/freezeout_speedup.py --models MIM_vit_base_patch16 mae_vit_base_patch16 --input_size 224 \\
        --patch_size 16 --num_images 0 --data_path /imagenet/train --batch_size 128 --epochs 4 --device cuda \\
        --amp bf16 --threads 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import cpu_model  # noqa: E402

DEFAULT_MODELS = ("mae_vit_tiny_patch16", "localmim_vit_tiny_patch16")
DEFAULT_CONFIGS = ("regular", "linear:0.5", "cubic:0.8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="mimkit model names")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="'regular' and FreezeOut schedules as how_scale:t_0 (the first must be regular)")
    p.add_argument("--epochs", type=int, default=8, help="pretraining epochs, the same for every run")
    p.add_argument("--warmup_epochs", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--blr", type=float, default=1.5e-3, help="base lr (lr = blr * batch / 256)")
    p.add_argument("--input_size", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--model_kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model.kwargs overrides for every model, e.g. depth=6 embed_dim=96")
    p.add_argument("--hog_nbins", type=int, default=9, help="LocalMIM models: HOG orientation bins")
    p.add_argument("--freeze_heads", action="store_true", help="FreezeOut runs: freeze a tap's head with its block")
    p.add_argument("--no_scale_lr", action="store_true", help="FreezeOut runs: keep every block's base lr")
    p.add_argument("--data_path", default="digits", help="pretraining images (built-in name or folder)")
    p.add_argument("--num_images", type=int, default=384,
                   help="pretrain on the first N training images of --data_path (written as PNG); 0 = all")
    p.add_argument("--knn_data", default="digits", help="labelled set for the k-NN evaluation; 'none' skips it")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20], help="k-NN neighbour counts")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--amp", default="off", help="auto | bf16 | fp16 | off")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (only one run computes at a time); 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="runs/freezeout_bench", help="run folders, results.json, results.md")
    args = p.parse_args(argv)
    if args.configs[0] != "regular" or args.configs.count("regular") != 1:
        p.error("--configs must start with 'regular' (the baseline) and name it once")
    for c in args.configs[1:]:
        how, _, t0 = c.partition(":")
        if how not in ("linear", "squared", "cubic") or not t0:
            p.error(f"bad configuration '{c}': use how_scale:t_0, e.g. cubic:0.8")
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch_size must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- run setup
def run_name(model: str, config: str) -> str:
    return f"{model}__{config.replace(':', '_t')}"


def pretrain_argv(args, model: str, config: str, data: str, out_dir: Path) -> list[str]:
    """The `mimkit pretrain` flags of one run."""
    argv = ["--model", model, "--data_path", data, "--output_dir", str(out_dir),
            "--input_size", str(args.input_size), "--patch_size", str(args.patch_size),
            "--epochs", str(args.epochs), "--warmup_epochs", str(args.warmup_epochs),
            "--batch_size", str(args.batch_size), "--blr", str(args.blr), "--num_workers", "0",
            "--device", args.device, "--amp", args.amp, "--seed", str(args.seed), "--no_auto_resume",
            "--save_freq_epochs", "0", "--keep_last_n", "1", "--print_freq", "100000",
            "logging.vis_freq_epochs=0", "logging.tensorboard=false"]
    if is_localmim(model):
        argv += ["--hog_nbins", str(args.hog_nbins)]
    argv += [f"model.kwargs.{kv}" for kv in args.model_kw]
    if config != "regular":
        how, _, t0 = config.partition(":")
        argv += ["--freezeout", "--how_scale", how, "--t_0", t0]
        argv += ["--freeze_heads"] if args.freeze_heads else []
        argv += ["--no_scale_lr"] if args.no_scale_lr else []
    return argv


def is_localmim(model: str) -> bool:
    return "localmim" in model.lower() or model.startswith("MIM_")


def build_cfg(argv: list[str]):
    from mimkit.commands import RaisingArgParser, command_parser, parse_command_args
    from mimkit.tasks import pretrain

    return pretrain.config_from_args(parse_command_args(command_parser("pretrain", RaisingArgParser), argv))


def write_subset(data: str, n: int, folder: Path) -> str:
    """The first n training images of a built-in set or folder, as PNGs in `folder` (a flat image folder)."""
    from mimkit.data.sources import open_dataset

    ds = open_dataset(data, "train", None)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i in range(min(n, len(ds))):
        ds[i][0].convert("RGB").save(folder / f"{i:05d}.png")
    return str(folder)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device) -> int:
    """The process's peak memory so far: CUDA max allocated, or the CPU peak RSS.

    On Linux VmHWM of /proc/self/status: getrusage's ru_maxrss survives execve, so in a spawned child it would
    report the parent's RSS at fork time whenever that is larger."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------- child
class Gate:
    """Engine hook of a benchmarked run: waits for its turn before each step and times its own step windows."""

    def __init__(self, conn, epochs: int):
        self.conn, self.epochs = conn, epochs
        self.t0 = self.c0 = 0.0
        self.steps: list[dict] = []  # {epoch, frozen, seconds}
        self.peak_before_reset = 0  # CUDA: the whole-run peak is the max of this and the final reading
        self.rss_at_start = 0

    def _wait(self) -> None:
        msg = self.conn.recv()
        if msg != "go":
            raise SystemExit(f"benchmark child: unexpected message {msg!r}")
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def on_train_start(self, trainer) -> None:
        self.rss_at_start = rss_bytes()  # model, data, optimiser built; no step taken yet
        if self.epochs == 1:
            self._reset(trainer.device)
        self.conn.send(("ready", {"iters_per_epoch": trainer.iters_per_epoch}))
        self._wait()

    def on_step_end(self, trainer) -> None:
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize(trainer.device)
        dt = time.perf_counter() - self.t0
        cpu = time.process_time() - self.c0  # this process's CPU time: what other jobs on the machine barely move
        # this hook runs before FreezeOut's own on_step_end: frozen_prefix is what this step trained with
        frozen = int(getattr(trainer.model, "frozen_prefix", 0))
        self.steps.append({"epoch": trainer.state.epoch, "frozen": frozen, "seconds": dt, "cpu_seconds": cpu})
        self.conn.send(("step", None))
        self._wait()

    def on_epoch_end(self, trainer, epoch: int) -> None:
        if epoch == self.epochs - 2:  # the last epoch starts next
            self._reset(trainer.device)

    def _reset(self, device) -> None:
        if device.type == "cuda":  # on CPU a last-epoch peak is not measurable: freed memory stays resident
            import torch

            self.peak_before_reset = peak_bytes(device)
            torch.cuda.reset_peak_memory_stats(device)


def child_main(conn, argv: list[str], threads: int, knn_argv: list[str] | None) -> None:
    """One benchmarked run: pretrain under the Gate, report memory, then (when let go) the k-NN evaluation."""
    run_dir = Path(argv[argv.index("--output_dir") + 1])
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from mimkit.tasks import pretrain

    base_rss = rss_bytes()
    cfg = build_cfg(argv)
    gate = Gate(conn, cfg.schedule.epochs)
    summary = pretrain.train(cfg, extra_hooks=[gate], print_summary=False)
    model = summary["model"]
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        last = peak_bytes(dev)  # since the reset before the last epoch
        peak = max(last, gate.peak_before_reset)
        mem = {"kind": "cuda max_memory_allocated", "peak_bytes": peak, "last_epoch_peak_bytes": last}
    else:
        peak = peak_bytes(dev)
        mem = {"kind": "cpu peak RSS minus the RSS at the first step (model, data, optimiser built)",
               "peak_bytes": peak - gate.rss_at_start, "last_epoch_peak_bytes": None, "peak_rss_bytes": peak,
               "rss_at_train_start_bytes": gate.rss_at_start, "rss_after_imports_bytes": base_rss}
    epochs = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    epochs = [r for r in epochs if r.get("kind") == "epoch"]
    conn.send(("trained", {"steps": gate.steps, "memory": mem, "final_loss": summary["final_loss"],
                           "epoch_loss": [r["loss"] for r in epochs], "final_checkpoint": summary["final_checkpoint"],
                           "frozen_at_end": int(getattr(model, "frozen_prefix", 0)), "depth": len(model.blocks)}))
    del model, summary
    if conn.recv() != "go":
        return
    knn = None
    if knn_argv is not None:
        from mimkit.api import run_command
        from mimkit.errors import UserError

        try:
            knn = run_command("knn", ["--checkpoint", summary_path(argv), *knn_argv]).results["metrics"]
        except UserError as e:
            knn = {"error": str(e)}
    conn.send(("knn", knn))


def summary_path(argv: list[str]) -> str:
    return str(Path(argv[argv.index("--output_dir") + 1]) / "checkpoints" / "final.pt")


# ---------------------------------------------------------------------------------------------- estimates
def reference_estimate(t: list[float]) -> dict:
    """FreezeOut's own estimate from the schedule: backward saving b = mean(1 - t_i), step saving 2/3 b."""
    b = sum(1 - ti for ti in t) / len(t)
    s = 2.0 / 3.0 * b
    return {"backward_saving": b, "time_saving": s, "speedup": 1.0 / (1.0 - s)}


def cost_by_frozen(argv: list[str], batch: int = 2) -> dict[str, list[float]]:
    """Per image, for k = 0..L frozen blocks, of one training step (forward + backward) of this model:
    `flops`: matmul / convolution / attention FLOPs (torch.utils.flop_counter);
    `saved_bytes`: bytes of the tensors autograd keeps for backward (saved_tensors_hooks, distinct storages).
    Frozen as the FreezeOut hook freezes: parameters of blocks < k (and the stem) stop requiring grad and the
    model's frozen prefix runs under no_grad."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mimkit import config as C
    from mimkit.engine.freezeout import FreezeOutHook
    from mimkit.tasks import pretrain

    cfg = build_cfg(argv)
    torch.manual_seed(0)
    model = pretrain.build_model(cfg, "cpu").train()
    hook = FreezeOutHook(model, 0.5, "linear", freeze_heads=bool(cfg.freezeout.freeze_heads))
    h, w = C.input_size(cfg)
    x = torch.randn(batch, model.in_chans, h, w)
    flops, saved = [], []
    for k in range(len(model.blocks) + 1):
        for name, prm in model.named_parameters():
            prm.requires_grad_(not 0 <= hook.block_of(name) < k)
            prm.grad = None
        model.frozen_prefix = k
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor):
            if not isinstance(t, torch.nn.Parameter):  # weights are kept anyway; count activations
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            return t

        # Two counters: entering a FlopCounterMode clears its counts, so re-entering one for backward would drop
        # the forward's FLOPs (what this script did before: the "counted saving" was backward's alone, too high).
        fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
        with fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, mask_ratio=cfg.model.mask_ratio)[0]
        with bwd:
            if loss.requires_grad:
                loss.backward()
        flops.append((fwd.get_total_flops() + bwd.get_total_flops()) / batch)
        saved.append(sum(storages.values()) / batch)
    return {"flops": flops, "saved_bytes": saved}


# ---------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    import torch

    info = {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from mimkit.engine.freezeout import freeze_times

    data = args.data_path
    if args.num_images > 0:
        data = write_subset(args.data_path, args.num_images, out / "pretrain_images")
    info = machine()
    print(f"machine: {info['nproc']} cpus, {info['cpu']}, torch {info['torch']}, load {info['load_avg_at_start']}")

    ctx = mp.get_context("spawn")
    runs: list[dict] = []
    cost: dict[str, dict] = {}
    for model in args.models:
        for config in args.configs:
            name = run_name(model, config)
            argv_run = pretrain_argv(args, model, config, data, out / name)
            knn_argv = None
            if args.knn_data != "none":
                knn_argv = ["--data_path", args.knn_data, "--k", *map(str, args.k), "--device", args.device,
                            "--seed", str(args.seed), "--output_dir", str(out / name / "knn")]
            runs.append({"model": model, "config": config, "name": name, "argv": argv_run, "knn_argv": knn_argv})
        cost[model] = cost_by_frozen(runs[-1]["argv"])

    # start every run; each builds its model and data, then waits at on_train_start
    for r in runs:
        parent, child = ctx.Pipe()
        r["conn"] = parent
        r["proc"] = ctx.Process(target=child_main, args=(child, r["argv"], args.threads, r["knn_argv"]), daemon=True)
        r["proc"].start()
    t_setup = time.perf_counter()
    for r in runs:
        kind, payload = receive(r)
        assert kind == "ready", kind
        r["iters_per_epoch"] = payload["iters_per_epoch"]
    print(f"{len(runs)} runs ready; {runs[0]['iters_per_epoch']} iterations/epoch x {args.epochs} epochs each, "
          f"interleaved step by step (setup {time.perf_counter() - t_setup:.0f}s)", flush=True)
    t_start = time.perf_counter()
    active, rnd = list(runs), 0
    while active:
        order = active[rnd % len(active):] + active[:rnd % len(active)]
        for r in order:
            r["conn"].send("go")
            kind, payload = receive(r)
            if kind == "trained":
                r.update(payload)
                active.remove(r)
        rnd += 1
    wall = time.perf_counter() - t_start
    print(f"training done in {wall:.0f}s (all runs, interleaved)"
          + ("; k-NN evaluations next" if args.knn_data != "none" else ""), flush=True)
    for r in runs:  # the k-NN evaluations, one at a time (not timed)
        r["conn"].send("go")
        kind, payload = receive(r)
        r["knn"] = payload
        r["proc"].join(timeout=60)
        if r["proc"].exitcode not in (0, None):
            print(f"warning: run {r['name']} exited with {r['proc'].exitcode}", file=sys.stderr)

    results = summarise(args, runs, cost, freeze_times)
    results.update(machine=info, wall_s_interleaved=wall, load_avg_at_end=os.getloadavg(),
                   command="python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None
                                                                                 else argv)]))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def receive(r: dict):
    """The next message of run `r`; a run that died ends the benchmark with its log's last lines, not EOFError
    (the other runs are daemon processes: they end with this one)."""
    try:
        return r["conn"].recv()
    except EOFError:
        log = Path(r["argv"][r["argv"].index("--output_dir") + 1])
        log = log.parent / f"{log.name}.log"
        tail = "\n".join(log.read_text().splitlines()[-15:]) if log.is_file() else "(no log)"
        raise SystemExit(f"run {r['name']} died; the end of {log}:\n{tail}") from None


def summarise(args, runs: list[dict], cost: dict, freeze_times) -> dict:
    """Per-run figures, and for each FreezeOut run its speed-up over the regular run of the same model."""
    out_runs = []
    for r in runs:
        per_epoch = [0.0] * args.epochs
        for s in r["steps"]:
            per_epoch[s["epoch"]] += s["seconds"]
        f, act = cost[r["model"]]["flops"], cost[r["model"]]["saved_bytes"]
        rec = {"model": r["model"], "config": r["config"], "freezeout": r["config"] != "regular",
               "epoch_time_s": per_epoch, "total_time_s": sum(per_epoch), "steps": len(r["steps"]),
               "total_cpu_s": sum(s["cpu_seconds"] for s in r["steps"]),
               "step_time_median_s": sorted(s["seconds"] for s in r["steps"])[len(r["steps"]) // 2],
               "frozen_per_step": [s["frozen"] for s in r["steps"]], "frozen_at_end": r["frozen_at_end"],
               "final_loss": r["final_loss"], "epoch_loss": r["epoch_loss"], "memory": r["memory"],
               "knn": r["knn"], "counted_gflop": sum(f[s["frozen"]] for s in r["steps"]) * args.batch_size / 1e9,
               "activation_bytes_first_last_step": [act[r["steps"][0]["frozen"]] * args.batch_size,
                                                    act[r["steps"][-1]["frozen"]] * args.batch_size],
               "argv": r["argv"]}
        if rec["freezeout"]:
            how, _, t0 = r["config"].partition(":")
            rec["t_i"] = freeze_times(r["depth"], float(t0), how)
            rec["reference_estimate"] = reference_estimate(rec["t_i"])
        out_runs.append(rec)
    for rec in out_runs:
        base = next(x for x in out_runs if x["model"] == rec["model"] and not x["freezeout"])
        rec["speedup"] = base["total_time_s"] / rec["total_time_s"]
        rec["time_saving"] = 1 - rec["total_time_s"] / base["total_time_s"]
        rec["cpu_time_saving"] = 1 - rec["total_cpu_s"] / base["total_cpu_s"]
        rec["epoch_time_ratio"] = [a / b if b else None for a, b in zip(rec["epoch_time_s"], base["epoch_time_s"])]
        rec["flop_saving"] = 1 - rec["counted_gflop"] / base["counted_gflop"]
        m0, m1 = base["memory"], rec["memory"]
        rec["peak_memory_ratio"] = m1["peak_bytes"] / m0["peak_bytes"] if m0["peak_bytes"] else None
        if m0["last_epoch_peak_bytes"]:
            rec["last_epoch_peak_memory_ratio"] = m1["last_epoch_peak_bytes"] / m0["last_epoch_peak_bytes"]
    settings = {k: v for k, v in vars(args).items()}
    return {"settings": settings, "runs": out_runs,
            "per_image_cost_by_frozen_blocks": cost}


def markdown(res: dict) -> str:
    """The main table, then per-epoch times relative to regular."""
    def mib(b):
        return f"{b / 2**20:.0f}" if b is not None else "-"

    k = res["settings"]["k"][0]
    head = ("| model | run | total s | speed-up (measured) | saving measured | saving in CPU time | "
            "saving counted FLOPs | "
            "saving est. (reference) | peak MiB (measured) | last-epoch peak MiB | "
            "activations for backward MiB, first -> last step (counted) | final loss | "
            f"k-NN top-1 k={k} (%) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["runs"]:
        est = r.get("reference_estimate")
        est_s = f"{100 * est['time_saving']:.1f}%" if est else "-"
        knn = r["knn"].get(f"knn_top1_k{k}") if isinstance(r["knn"], dict) else None
        knn_s = f"{knn:.1f}" if knn is not None else "-"
        act = r["activation_bytes_first_last_step"]
        lines.append(
            f"| {r['model']} | {r['config']} | {r['total_time_s']:.1f} | {r['speedup']:.3f} | "
            f"{100 * r['time_saving']:.1f}% | {100 * r['cpu_time_saving']:.1f}% | {100 * r['flop_saving']:.1f}% | "
            f"{est_s} | "
            f"{mib(r['memory']['peak_bytes'])} | {mib(r['memory']['last_epoch_peak_bytes'])} | "
            f"{act[0] / 2**20:.1f} -> {act[1] / 2**20:.1f} | {r['final_loss']:.4f} | {knn_s} |")
    n_ep = len(res["runs"][0]["epoch_time_s"])
    lines += ["", "Seconds per epoch (FreezeOut / regular in brackets):", "",
              "| model | run | " + " | ".join(f"ep {e}" for e in range(n_ep)) + " |",
              "|---|---|" + "---|" * n_ep]
    for r in res["runs"]:
        cells = [f"{t:.1f}" + ("" if not r["freezeout"] else f" ({q:.2f})")
                 for t, q in zip(r["epoch_time_s"], r["epoch_time_ratio"])]
        lines.append(f"| {r['model']} | {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
