"""The `batchrun` command line: parses options, calls the library, prints with rich. No logic lives here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from batchrun import __version__, defaults
from batchrun.errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: their [brackets] are literal
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay one line in logs, however long
F = TypeVar("F", bound=Callable[..., Any])

ModelOption = Annotated[str, typer.Option("--model", "-m", help="A Hugging Face model directory, or the name "
                                          f"of a built-in model ({defaults.BUILTIN_MODEL}: tiny, random "
                                          "weights, meaningless text; for demos and tests).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout) instead "
                                          "of tables.")]


def user_errors(command: F) -> F:
    """Turns a UserError into one line on stderr and its exit code: no traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a full disk, a missing permission: the file and the reason say it all
            err.print(f"[bold red]error:[/] {e.filename or ''}: {e.strerror or e}", highlight=False)
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt:
            err.print("interrupted: what was written is kept; run the same command again to resume",
                      highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"batchrun {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print batchrun's version and exit.")] = False,
) -> None:
    """Offline batch LLM inference over JSONL files, planned globally so shared prompt prefixes are computed
    once. Typical use: `batchrun plan in.jsonl -o job.plan`, then `batchrun run --plan job.plan -o out.jsonl`,
    then `batchrun stats out.jsonl`."""


@app.command()
@user_errors
def plan(
    input: Annotated[Path | None, typer.Argument(help="Input JSONL: one request per line (plain or OpenAI "
                                                 "batch format).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the plan "
                                                "[default: INPUT with the suffix .plan].")] = None,
    model: ModelOption = defaults.BUILTIN_MODEL,
    kv_budget: Annotated[str, typer.Option(help="KV-cache memory that one batch may hold (e.g. 4GiB, "
                                           "512MiB); batches are sized by it.")] = defaults.KV_BUDGET,
    min_prefix_len: Annotated[int, typer.Option(min=1, help="Shortest prefix worth sharing, in tokens.")]
    = defaults.MIN_PREFIX_LEN,
    max_levels: Annotated[int, typer.Option(min=1, help="Deepest chain of shared prefixes (system prompt → "
                                            "document → ...).")] = defaults.MAX_LEVELS,
    share: Annotated[bool, typer.Option("--share/--no-share", help="Share prefixes (--no-share runs every "
                                        "request alone: to measure what sharing gains).")] = True,
    dtype: Annotated[str | None, typer.Option(help="Weights and KV dtype: float32, bfloat16 or float16 "
                                              "[default: the model's own].")] = None,
    show: Annotated[Path | None, typer.Option("--show", help="Print an existing plan's summary and groups "
                                              "instead of planning.", show_default=False)] = None,
    groups: Annotated[int, typer.Option(help="With --show: how many groups to list.")] = 20,
    json: JsonOption = False,
) -> None:
    """Tokenize INPUT, find the prompt prefixes requests share, group and order them, and write a plan."""
    from batchrun.model.spec import resolve_model
    from batchrun.plan_view import plan_summary_json, render_plan_groups, render_plan_summary
    from batchrun.planfile import load_plan, save_plan
    from batchrun.planner import PlannerConfig
    from batchrun.planning import build_plan
    from batchrun.sizes import parse_size
    from batchrun.tokenizer import load_tokenizer

    if show is not None:
        shown = load_plan(show)
        if json:
            _print_json(plan_summary_json(shown.header))
            return
        render_plan_summary(out, shown.header, title=f"plan {show}")
        render_plan_groups(out, shown, load_tokenizer(resolve_model(shown.header.model_path)), limit=groups)
        return
    if input is None:
        raise UserError("give the INPUT file to plan (or --show PLAN to look at a plan)", exit_code=2)
    spec = resolve_model(model, dtype=dtype)
    config = PlannerConfig(kv_budget_bytes=parse_size(kv_budget), min_prefix_len=min_prefix_len,
                           max_levels=max_levels, share=share)
    made = build_plan(input, spec, load_tokenizer(spec), config)
    target = output or input.with_suffix(".plan")
    save_plan(made, target)
    if json:
        _print_json({**plan_summary_json(made.header), "plan": str(target)})
    else:
        render_plan_summary(out, made.header, title=f"plan written to {target}")
        if made.invalid:
            first = made.invalid[0]
            err.print(f"{len(made.invalid)} invalid line(s), kept as error records; the first: "
                      f"line {first.line}: {first.message}", highlight=False)


@app.command()
@user_errors
def run(
    plan_path: Annotated[Path, typer.Option("--plan", "-p", help="The plan made by `batchrun plan`.",
                                            show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL: one line per request, appended "
                                         "as each finishes; run again to resume.", show_default=False)],
    errors: Annotated[Path | None, typer.Option("--errors", help="Write error lines here instead of into the "
                                                "output (as the OpenAI Batch API does).", show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Another copy of the plan's model "
                                              "[default: the model the plan names].", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = defaults.DEVICE,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the model on the CPU [default: "
                                                "torch's, one per core]; fewer when other jobs share the cores.",
                                                show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Run on N workers (one per GPU, else "
                                                "CPU processes) on a local Ray cluster; needs batchrun[ray].",
                                                show_default=False)] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster (e.g. auto); "
                                                    "--workers defaults to one per GPU there.",
                                                    show_default=False)] = None,
    kv_budget: Annotated[str, typer.Option(help="KV-cache memory of the run (e.g. 12GiB), or auto: a share of "
                                           "the free device memory (CUDA) or of available RAM (CPU) once the "
                                           "weights are loaded. Not the plan's --kv-budget, which only shaped "
                                           "its batches.")] = defaults.RUN_KV_BUDGET,
    max_step_tokens: Annotated[int, typer.Option(min=1, help="Tokens one step computes: every running request's "
                                                 "decode token, then prefill chunks up to this.")]
    = defaults.MAX_STEP_TOKENS,
    json: JsonOption = False,
) -> None:
    """Execute a plan: each shared prefix computed once, every result appended to the output as it finishes."""
    if workers is not None or ray_address is not None:
        if kv_budget != defaults.RUN_KV_BUDGET or max_step_tokens != defaults.MAX_STEP_TOKENS:
            raise UserError("--kv-budget and --max-step-tokens apply to a single-process run; with --workers "
                            "each worker runs with the plan's budget", exit_code=2)
        from batchrun.distributed.driver import run_distributed

        outcome = run_distributed(plan_path, output, errors_path=errors, model=model, device=device,
                                  workers=workers, ray_address=ray_address, console=err)
    else:
        from batchrun.runner import run_plan_file

        outcome = run_plan_file(plan_path, output, errors_path=errors, model=model, device=device, threads=threads,
                                console=err, kv_budget=kv_budget, max_step_tokens=max_step_tokens)
    summary = {"requests": outcome.num_requests, "resumed": outcome.num_resumed,
               "completed": outcome.num_completed, "failed": outcome.num_failed,
               "output_tokens": outcome.output_tokens, "wall_seconds": round(outcome.wall_seconds, 3),
               "output": str(output)}
    if json:
        _print_json(summary)
    else:
        out.print(f"{outcome.num_completed} completed, {outcome.num_failed} failed, {outcome.num_resumed} "
                  f"already done; {outcome.output_tokens} output tokens in {outcome.wall_seconds:.1f}s → "
                  f"{output}", highlight=False)
    if not outcome.is_clean:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@user_errors
def stats(
    paths: Annotated[list[Path], typer.Argument(help="Output JSONL files of `batchrun run` (their metrics files "
                                                "beside them are read too), or a plan file.", show_default=False)],
    json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw throughput, batch size and the "
                                              "prefill/decode split to this PNG.", show_default=False)] = None,
) -> None:
    """Report what runs achieved and where the time went; several runs are compared side by side."""
    from batchrun.plan_view import plan_summary_json, render_plan_summary
    from batchrun.planfile import load_plan_header
    from batchrun.stats import load_report, report_json, stats_target_kind
    from batchrun.stats_view import plot_report, render_report

    if len(paths) == 1 and stats_target_kind(paths[0]) == "plan":
        header = load_plan_header(paths[0])
        if json:
            _print_json(plan_summary_json(header))
        else:
            render_plan_summary(out, header, title=f"plan {paths[0]}")
        return
    reports = [load_report(p) for p in paths]
    if json:
        payload = report_json(reports[0]) if len(reports) == 1 else {"runs": [report_json(r) for r in reports]}
        _print_json(payload)
    else:
        render_report(out, reports)
    if plot is not None:
        err.print(f"plot written to {plot_report(reports, plot)}")


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


def main() -> None:
    app()
