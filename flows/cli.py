"""`lvr`: the command line. Each command is a thin wrapper over plain functions in `tasks/` and the
Prefect flows in `flows/pipeline.py`. Heavy modules (Prefect, torch, matplotlib) are imported by the
commands that use them, so `lvr --help` and `lvr status` answer at once."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.config import DEFAULT_CONFIG, ConfigError, load_config
from tasks.engine.runs import workdir_status
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tasks.preflight.findings import PreflightError
from tasks.stages import STAGE_NAMES, TRAINING_STAGES, stage_spec

if TYPE_CHECKING:
    from flows.local_api import LocalApi

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvr", description="Long videos to a reasoning dataset and a trained reasoning VLM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (or a range of its stages)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="built-in config name or YAML path (default: tiny)")
    run.add_argument("--source", default=None, help="directory, list file, Parquet/CSV manifest or video file (taken literally), or glob:PATTERN (default: built-in sample)")
    run.add_argument("--workdir", default="runs/sample", help="where artifacts go: a path or fsspec URL (default: runs/sample)")
    run.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, default=None, help="first stage (default: clip)")
    run.add_argument("--to", dest="to_stage", choices=STAGE_NAMES, default=None, help="last stage (default: eval)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    run.add_argument(
        "--engine", choices=("prefect", "local"), default="prefect",
        help="prefect: run as the lvr-pipeline flow (default); local: the same stages without Prefect",
    )
    run.add_argument(
        "--retry-failures", action="store_true",
        help="process again the items stages recorded as failures (finished items are kept)",
    )
    run.add_argument(
        "--allow-shrink", action="store_true",
        help="accept a source listing fewer than clip.max_shrink of the last complete run's videos (refused by default)",
    )
    run.add_argument(
        "--no-wait", action="store_true",
        help="fail at once, naming the other run, when another run is writing a stage of this workdir (default: wait)",
    )
    run.add_argument(
        "--execution", choices=("local", "deployments"), default="local",
        help="with --engine prefect: run stages in this process (default), or each as a run of its `lvr-<stage>` "
        "deployment on the server at PREFECT_API_URL (their work pools, images and GPUs)",
    )

    sub.add_parser("stages", help="list the pipeline's stages")

    status = sub.add_parser("status", help="per-stage status of a workdir")
    status.add_argument("workdir")

    deploy = sub.add_parser(
        "deploy",
        help="register prefect.yaml's deployments on the server at PREFECT_API_URL, all on one work pool: a process "
        "pool running this checkout, or a Docker pool running an image (single machine; production: prefect deploy --all)",
    )
    deploy.add_argument("--pool", default="lvr-local",
                        help="the work pool: a process pool to create or update, or with --image a Docker pool that exists (default: lvr-local)")
    deploy.add_argument("--image", default=None,
                        help="run every flow run as a container of this image (e.g. lvr-cpu:0.1.0) on the Docker pool --pool; "
                        "local --workdir/--source paths must be mounted at the same path by the pool's volumes")
    deploy.add_argument("--workdir", default="runs/deployed", help="default workdir of every deployment (default: runs/deployed)")
    deploy.add_argument("--source", default=None, help="default source of the deployments that take one (default: the built-in sample)")
    deploy.add_argument("--config", default=DEFAULT_CONFIG, help="default config (default: tiny)")
    deploy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="default override, repeatable")

    synth = sub.add_parser(
        "synth", help="write a synthetic, verifiable video QA set as a complete filter/ (then: lvr run --workdir W --from sft)"
    )
    synth.add_argument("workdir")
    synth.add_argument("--videos", type=int, default=600)
    synth.add_argument("--seed", type=int, default=0)

    report = sub.add_parser("report", help="rebuild <workdir>/report/index.html")
    report.add_argument("workdir")

    publish = sub.add_parser(
        "publish", help="write the dataset (HF datasets layout) and trained models with cards to --out; --repo pushes them to the Hub"
    )
    publish.add_argument("workdir")
    publish.add_argument("--out", required=True, help="folder for dataset/ and models/<stage>/ (both replaced)")
    publish.add_argument("--repo", default=None, metavar="ORG/NAME",
                         help="push the dataset to this dataset repo and each model to ORG/NAME-<stage> (needs HF_TOKEN)")
    publish.add_argument("--private", action="store_true", help="create the repos as private")
    publish.add_argument("--dry-run", action="store_true", help="with --repo: list what would be uploaded, contact nothing")

    sample = sub.add_parser("sample-videos", help="write the built-in synthetic sample videos")
    sample.add_argument("dir")
    sample.add_argument("--overwrite", action="store_true")

    models = sub.add_parser("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    from models.tiny import TINY, TINY_CAPTIONER, TINY_SHAPES

    tiny = models_sub.add_parser(
        "build-tiny",
        help=f"build the tiny Qwen2.5-VL models the CPU profile uses: {TINY!r} (random weights) and {TINY_CAPTIONER!r} "
        "(pretrained to caption the sample's kinds of scene, a few CPU minutes); cached, so a second call returns at once",
    )
    tiny.add_argument("--name", choices=sorted(TINY_SHAPES), default=None,
                      help=f"build only this model (default: {TINY} and {TINY_CAPTIONER}; with --out, {TINY})")
    tiny.add_argument("--out", default=None, help="target folder of one model (default: its folder under $LVR_CACHE_DIR)")
    tiny.add_argument("--seed", type=int, default=None, help="a different random init (default: the standard tiny seed)")
    tiny.add_argument("--overwrite", action="store_true")

    arch = models_sub.add_parser(
        "architecture",
        help="refresh the architecture file (config.json, no weights) lvr check uses for a hub model without local weights",
    )
    arch.add_argument("model_id", help="the hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct")
    arch.add_argument("--from", dest="origin", required=True,
                      help="a local snapshot folder of the model, or 'hub' to download only its config file (needs the hub)")
    arch.add_argument("--file", default="config.json", help="the config file inside the snapshot (NVILA: llm/config.json)")
    arch.add_argument("--revision", default=None, help="with --from hub: the revision to read")
    arch.add_argument("--out", default=None, help="folder to write to (default: lvr's configs/architectures)")

    check = sub.add_parser(
        "check",
        help="check a config before running it: topology vs the models' heads, video tokens vs context, memory per GPU, "
        "endpoints and keys, workdir and source (exit 2 on an error; lvr run does the same before its first stage)",
    )
    check.add_argument("--config", default=DEFAULT_CONFIG, help="built-in config name or YAML path (default: tiny)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    check.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, default=None, help="first stage of the run (default: clip)")
    check.add_argument("--to", dest="to_stage", choices=STAGE_NAMES, default=None, help="last stage of the run (default: eval)")
    check.add_argument("--workdir", default=None, help="the run's workdir: checked for writing (remote ones with --probe)")
    check.add_argument("--source", default=None, help="the run's source: checked for reading (local)")
    check.add_argument("--probe", action="store_true", help="also send one one-token request to every configured endpoint")

    show = sub.add_parser("config", help="print a resolved config (after overrides)")
    show.add_argument("--config", default=DEFAULT_CONFIG)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    pool = sub.add_parser(
        "pool-template",
        help="write a work pool base job template with site defaults (e.g. network, env) for prefect work-pool create",
    )
    pool.add_argument("template", help="a base job template, e.g. deploy/work-pools/docker-cpu.json")
    pool.add_argument("--out", required=True, help="where to write the result")
    pool.add_argument("--default", dest="defaults", action="append", default=[], metavar="VARIABLE=JSON",
                      help='a new default, repeatable: --default \'networks=["lvr_default"]\'')

    node = sub.add_parser(
        "train-node",
        help="one node of a multi-node sft/grpo run: node 0 runs the stage (as lvr run), node K > 0 joins it with torchrun",
    )
    node.add_argument("stage", help="sft or grpo")
    node.add_argument("--node-rank", type=int, required=True, help="this node's rank (Kubernetes Indexed Job: $(JOB_COMPLETION_INDEX))")
    node.add_argument("--workdir", required=True, help="the run's workdir, on a filesystem every node mounts")
    node.add_argument("--config", default=DEFAULT_CONFIG, help="built-in config name or YAML path (default: tiny)")
    node.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    node.add_argument("--engine", choices=("prefect", "local"), default="prefect", help="node 0: how the stage runs, as in lvr run")
    node.add_argument("--wait-timeout", type=float, default=3600.0, help="nodes > 0: seconds to wait for node 0's job (default 3600)")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        # One line per API call to Prefect's server drowns the pipeline's own messages.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    if args.engine != "prefect":
        return _run(args, None)
    from flows.local_api import local_api_started

    # Prefect's local API server (when no PREFECT_API_URL is set) starts first and comes up while
    # the config and the checks below are read.
    with local_api_started() as api:
        return _run(args, api)


def _run(args: argparse.Namespace, api: LocalApi | None) -> int:
    flags = {"retry_failures": "execution.retry_failures=true", "allow_shrink": "execution.allow_shrink=true",
             "no_wait": "execution.wait_for_lock=false"}
    args.overrides = [*args.overrides, *(override for flag, override in flags.items() if getattr(args, flag))]
    try:
        # Fail fast, before any flow runs: the config, then lvr check of the stages this run executes.
        from tasks.pipeline import select_stages
        from tasks.preflight.checks import preflight

        cfg = load_config(args.config, args.overrides)
        stages = select_stages(args.from_stage, args.to_stage)
        preflight(cfg, stages, workdir=args.workdir, source=args.source)
        if args.engine == "local" and args.execution != "local":
            raise ConfigError("--execution deployments needs --engine prefect (stages run as Prefect deployments)")
        if args.engine == "local":
            from tasks.pipeline import resolve_source, run_pipeline
            from tasks.report import update_report

            record = run_pipeline(
                Workdir(args.workdir), cfg, source=resolve_source(args.source, cfg, stages),
                from_stage=args.from_stage, to_stage=args.to_stage, on_stage_done=update_report,
            )
            results = record.results
        else:
            from flows.local_api import using
            from flows.pipeline import lvr_pipeline

            try:
                with using(api):
                    result = lvr_pipeline(
                        source=args.source, workdir=args.workdir, config=args.config, overrides=args.overrides,
                        from_stage=args.from_stage or STAGE_NAMES[0], to_stage=args.to_stage or STAGE_NAMES[-1],
                        execution=args.execution,
                    )
            finally:
                _prune_ephemeral_history(cfg.execution.history_retention_days)
            results = result["results"]
    except ConfigError as exc:
        print(f"lvr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PreflightError as exc:
        print(f"lvr: {exc}\nlvr: nothing ran; `lvr check` prints the whole report", file=sys.stderr)
        return EXIT_USAGE
    except (StageError, ValueError) as exc:
        _print_summary(args.workdir)
        print(f"\nlvr: pipeline failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(args.workdir)
    done = [s for s, r in results.items()]
    print(f"\nlvr: finished {', '.join(done)} in {args.workdir}")
    return 0


def _prune_ephemeral_history(retention_days: float | None) -> None:
    """Keep the ephemeral API's database from growing forever (flows/history.py); never fails a run."""
    from datetime import timedelta

    from flows.history import prune_local_history_if_due
    from flows.local_api import needs_local_api

    if retention_days is None or not needs_local_api():
        return
    try:
        pruned = prune_local_history_if_due(timedelta(days=retention_days))
    except Exception as exc:  # housekeeping: the run's outcome stands whatever happens here
        print(f"lvr: could not prune Prefect's run history: {exc}", file=sys.stderr)
        return
    if pruned is not None and pruned.deleted:
        print(f"lvr: pruned Prefect's run history: {pruned.deleted} flow runs that ended over {retention_days:g} days ago "
              f"(execution.history_retention_days); {pruned.flow_runs_after} kept")


def _print_summary(workdir: str) -> None:

    wd = Workdir(workdir)
    if not wd.exists():
        return
    rows = workdir_status(wd, STAGE_NAMES)
    print(f"\n{'stage':<9} {'status':<16} {'rows':>8} {'failures':>9} {'work s':>9} {'wall s':>9}  note")
    for s in rows:
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        print(
            f"{s.stage:<9} {s.status:<16} {fmt(s.rows, 'd'):>8} {fmt(s.failures, 'd'):>9} "
            f"{fmt(s.work_time_s, '.2f'):>9} {fmt(s.wall_time_s, '.2f'):>9}  {s.message}"
        )


def cmd_status(args: argparse.Namespace) -> int:

    if not Workdir(args.workdir).exists():
        print(f"lvr: no workdir at {args.workdir}", file=sys.stderr)
        return EXIT_USAGE
    print(f"workdir: {Workdir(args.workdir).url}")
    _print_summary(args.workdir)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.samples.synth import SynthSpec, write_synth

    report = write_synth(args.workdir, SynthSpec(videos=args.videos, seed=args.seed))
    print(f"{report.rows} questions ({report.status}) in {args.workdir}/filter; next: lvr run --workdir {args.workdir} --from sft")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.report import build_report

    if not Workdir(args.workdir).exists():
        print(f"lvr: no workdir at {args.workdir}", file=sys.stderr)
        return EXIT_USAGE
    print(build_report(args.workdir))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from tasks.publish import (
        PublishError,
        check_repo_id,
        export_workdir,
        format_plan,
        hub_token,
        push,
        upload_plan,
    )

    token = None
    try:
        if args.dry_run and not args.repo:
            raise PublishError("--dry-run lists an upload: give --repo org/name")
        if args.repo:
            check_repo_id(args.repo)
        if args.repo and not args.dry_run:
            token = hub_token()
            if not token:
                raise PublishError("--repo needs a Hugging Face write token: set HF_TOKEN (or run `hf auth login`), or add --dry-run")
        export = export_workdir(args.workdir, args.out, args.repo)
    except PublishError as exc:
        print(f"lvr: {exc}", file=sys.stderr)
        return EXIT_USAGE
    counts = export.data.counts
    print(f"dataset: {export.dataset_dir} ({', '.join(f'{s} {counts.per_split[s]}' for s in export.data.files)})")
    for model in export.models:
        print(f"model: {export.model_dir(model.stage)} ({model.stage})")
    if not args.repo:
        return 0
    plan = upload_plan(export, args.repo)
    print(("dry run, nothing uploaded; would upload:\n" if args.dry_run else "uploading:\n") + format_plan(plan))
    if args.dry_run:
        return 0
    try:
        for url in push(plan, token, private=args.private):
            print(url)
    except Exception as exc:  # noqa: BLE001 -- the Hub's and the network's errors alike: say which, never the token
        print(f"lvr: upload failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_stages(_: argparse.Namespace) -> int:
    for i, name in enumerate(STAGE_NAMES, 1):
        print(f"{i}. {name:<8} {stage_spec(name).description}")
    return 0


def cmd_sample_videos(args: argparse.Namespace) -> int:
    from tasks.samples.videos import write_sample_videos

    for path in write_sample_videos(args.dir, overwrite=args.overwrite):
        print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "architecture":
        return cmd_models_architecture(args)
    from models.tiny import (
        TINY,
        TINY_CAPTIONER,
        build_tiny_qwen2_5_vl,
        default_tiny_dir,
        ensure_tiny_model,
    )

    for name in [args.name or TINY] if args.name or args.out else [TINY, TINY_CAPTIONER]:
        out = args.out or default_tiny_dir(name)
        if args.seed is None and not args.overwrite:
            print(ensure_tiny_model(out, name=name))  # already built: nothing to do
        else:
            print(build_tiny_qwen2_5_vl(out, seed=args.seed or 0, overwrite=args.overwrite, name=name))
    return 0


def cmd_models_architecture(args: argparse.Namespace) -> int:
    import json

    from models.architecture import ArchitectureError, architecture_record, write_architecture

    try:
        if args.origin == "hub":
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(args.model_id, args.file, revision=args.revision))
        else:
            folder = Path(args.origin).expanduser()
            path = folder / args.file if folder.is_dir() else folder
        record = architecture_record(args.model_id, json.loads(path.read_text(encoding="utf-8")), args.file)
        print(write_architecture(args.model_id, record, args.out))
    except (OSError, ValueError, ArchitectureError) as exc:
        print(f"lvr: {args.model_id}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tasks.pipeline import select_stages
    from tasks.preflight.checks import check_config

    try:
        cfg = load_config(args.config, args.overrides)
        stages = select_stages(args.from_stage, args.to_stage)
    except (ConfigError, ValueError) as exc:
        print(f"lvr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = check_config(cfg, stages, workdir=args.workdir, source=args.source, probe=args.probe)
    print(report.render())
    return EXIT_USAGE if report.errors else 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"lvr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def node_zero_argv(args: argparse.Namespace) -> list[str]:
    """Node 0's part of a multi-node stage is the stage run itself: every node gets one command
    (`train-node`), and node 0's means `lvr run --from STAGE --to STAGE` with the same settings."""
    argv = ["-v"] if args.verbose else []
    argv += ["run", "--config", args.config, "--workdir", args.workdir, "--from", args.stage, "--to", args.stage, "--engine", args.engine]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def cmd_deploy(args: argparse.Namespace) -> int:
    import subprocess

    from flows.deploy import DeployError, deploy_single_machine

    try:
        load_config(args.config, args.overrides)  # a typo fails here, not at 02:00 in the nightly run
    except ConfigError as exc:
        print(f"lvr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parameters = {
        "workdir": _absolute(args.workdir), "config": args.config, "overrides": args.overrides,
        # None: the config's source, else the built-in sample (made on first use), so a fresh
        # machine's first run from the UI works without any video at hand.
        "source": _absolute(args.source) if args.source else None,
    }
    try:
        names = deploy_single_machine(args.pool, parameters, image=args.image)
    except DeployError as exc:
        print(f"lvr: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except subprocess.CalledProcessError as exc:
        print(f"lvr: {' '.join(exc.cmd[1:4])} failed (exit {exc.returncode}); is PREFECT_API_URL a running server?", file=sys.stderr)
        return EXIT_FAILED
    print(f"lvr: {len(names)} deployments on work pool {args.pool!r}: {', '.join(names)}")
    kind = " --type docker" if args.image else ""
    print(f"lvr: start a worker for them: prefect worker start --pool {args.pool}{kind}")
    return 0


def cmd_pool_template(args: argparse.Namespace) -> int:
    import json

    from flows.deploy import with_defaults

    defaults = {}
    for item in args.defaults:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected VARIABLE=JSON")
            defaults[name] = json.loads(value)
        except ValueError as exc:
            print(f"lvr: --default {item!r}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        template = with_defaults(json.loads(Path(args.template).read_text()), defaults)
    except (OSError, ValueError) as exc:
        print(f"lvr: {args.template}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    Path(args.out).write_text(json.dumps(template, indent=2) + "\n")
    return 0


def _absolute(location: str) -> str:
    """Worker processes start elsewhere: local paths become absolute, URLs stay as they are."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def cmd_train_node(args: argparse.Namespace) -> int:
    if args.stage not in TRAINING_STAGES:
        print(f"lvr: train-node runs a training stage ({', '.join(TRAINING_STAGES)}), not {args.stage!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.node_rank == 0:
        return main(node_zero_argv(args))
    from parallel.launch import WorkerFailed
    from tasks.training.nodes import run_training_node

    try:
        ctx = StageContext(Workdir(args.workdir), load_config(args.config, args.overrides))
        result = run_training_node(args.stage, ctx, args.node_rank, timeout_s=args.wait_timeout)
    except ConfigError as exc:
        print(f"lvr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StageError, TimeoutError, WorkerFailed) as exc:
        print(f"lvr: {args.stage} node {args.node_rank} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result is None:
        print(f"lvr: {args.stage} is complete in {args.workdir}; node {args.node_rank} had nothing to run")
    else:
        print(f"lvr: {args.stage} node {args.node_rank} finished in {result.wall_s:.1f} s")
    return 0


COMMANDS = {"run": cmd_run, "stages": cmd_stages, "status": cmd_status, "report": cmd_report, "synth": cmd_synth, "sample-videos": cmd_sample_videos,
            "models": cmd_models, "config": cmd_config, "train-node": cmd_train_node, "deploy": cmd_deploy,
            "pool-template": cmd_pool_template, "publish": cmd_publish, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    # Our own loggers appear in Prefect's UI next to the flow's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lvr")
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    return COMMANDS[args.command](args)


def entrypoint() -> None:
    """`lvr` as a command: `main`, then the exit handlers (logging's, Prefect's, multiprocessing's)
    and flushed output, and the process ends without tearing down every module it loaded, which
    after a run that loaded torch and transformers took ~1.2 s of nothing on 2 cores."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler or coverage is watching: the normal exit lets it write its results
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
