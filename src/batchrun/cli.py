"""The `batchrun` command line: parses options, calls the library, prints with rich. No logic lives here."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from batchrun import __version__, defaults
from batchrun.errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, UserError

if TYPE_CHECKING:
    from batchrun.planner import PlannerConfig

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: their [brackets] are literal
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay one line in logs, however long
F = TypeVar("F", bound=Callable[..., Any])

ModelOption = Annotated[str, typer.Option("--model", "-m", help="A Hub id found in the local Hugging Face cache "
                                          "(e.g. Qwen/Qwen2.5-0.5B-Instruct; see --download), a model directory, "
                                          f"or the name of a built-in model ({defaults.BUILTIN_MODEL}: tiny, random "
                                          "weights, meaningless text; for demos and tests).")]
DownloadOption = Annotated[bool, typer.Option("--download", help="Fetch a Hub model absent from the Hugging Face "
                                              "cache (by default nothing is downloaded).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout) instead "
                                          "of tables.")]


def user_errors(command: F) -> F:
    """Turns a UserError into one line on stderr and its exit code: no traceback for a user's mistake."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupt_on_signals():
                return command(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a full disk, a missing permission: the file and the reason say it all
            where = f"{e.filename}: " if e.filename else ""
            err.print(f"[bold red]error:[/] {where}{e.strerror or e}", highlight=False)
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupt_on_signals)
            err.print("interrupted: what was written is kept; run the same command again to resume",
                      highlight=False)
            raise typer.Exit(EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same message, and the run resumes when started again."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread for the command's duration (whatever handler a library
    left), so `finally` blocks run: output fsynced, a plan's temporary file removed."""

    def raise_interrupt(signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    previous = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
    once. Typical use: `batchrun run in.jsonl -o out.jsonl` (plans, then runs; the same command resumes),
    then `batchrun stats out.jsonl`; or in two steps, `batchrun plan in.jsonl -o job.plan`, then
    `batchrun run job.plan -o out.jsonl`."""


InputOption = Annotated[Path | None, typer.Option("--input", "-i", help="Input JSONL, as an option (as vLLM's "
                                                  "run-batch takes it); '-' reads standard input.",
                                                  show_default=False)]
DtypeOption = Annotated[str | None, typer.Option(help="Weights and KV dtype: float32, bfloat16 or float16 "
                                                 "[default: the model's own].", show_default=False)]
KvBudgetOption = Annotated[str | None, typer.Option(help="KV-cache memory that one batch may hold (e.g. 4GiB, "
                                                    "512MiB); batches are sized by it "
                                                    f"[default: {defaults.KV_BUDGET}].", show_default=False)]
MinPrefixOption = Annotated[int | None, typer.Option(min=1, help="Shortest prefix worth sharing, in tokens "
                                                     f"[default: {defaults.MIN_PREFIX_LEN}].", show_default=False)]
MaxLevelsOption = Annotated[int | None, typer.Option(min=1, help="Deepest chain of shared prefixes (system prompt "
                                                     f"→ document → ...) [default: {defaults.MAX_LEVELS}].",
                                                     show_default=False)]
ShareOption = Annotated[bool | None, typer.Option("--share/--no-share", help="Share prefixes (--no-share runs "
                                                  "every request alone: to measure what sharing gains) "
                                                  "[default: share].", show_default=False)]


@app.command()
@user_errors
def plan(
    input: Annotated[Path | None, typer.Argument(help="Input JSONL: one request per line (plain or OpenAI "
                                                 "batch format); '-' reads standard input (kept beside the "
                                                 "plan as PLAN.input.jsonl).", show_default=False)] = None,
    input_option: InputOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the plan "
                                                "[default: INPUT with the suffix .plan].")] = None,
    model: ModelOption = defaults.BUILTIN_MODEL,
    kv_budget: KvBudgetOption = None,
    min_prefix_len: MinPrefixOption = None,
    max_levels: MaxLevelsOption = None,
    share: ShareOption = None,
    dtype: DtypeOption = None,
    download: DownloadOption = False,
    chat_template: Annotated[Path | None, typer.Option("--chat-template", help="A Jinja chat template file "
                                                       "to use instead of the model's.", show_default=False)] = None,
    show: Annotated[Path | None, typer.Option("--show", help="Print an existing plan's summary and groups "
                                              "instead of planning.", show_default=False)] = None,
    groups: Annotated[int, typer.Option(help="With --show: how many groups to list.")] = 20,
    json: JsonOption = False,
) -> None:
    """Tokenize INPUT, find the prompt prefixes requests share, group and order them, and write a plan."""
    from batchrun.api import make_plan
    from batchrun.plan_view import plan_summary_json, render_plan_summary

    input = _one_input(input, input_option)
    if show is not None:
        if input is not None:
            raise UserError(f"give INPUT to plan or --show PLAN to look at a plan, not both ({input} and --show "
                            f"{show})", exit_code=EXIT_USAGE)
        _show_plan(show, groups=groups, json=json)
        return
    if input is None:
        raise UserError("give the INPUT file to plan (or --show PLAN to look at a plan)", exit_code=EXIT_USAGE)
    made = make_plan(input, output, model=model, dtype=dtype, download=download,
                     config=_planner_config(kv_budget, min_prefix_len, max_levels, share, always=True),
                     chat_template=chat_template)
    if json:
        _print_json({**plan_summary_json(made.plan.header), "plan": str(made.path)})
    else:
        render_plan_summary(out, made.plan.header, title=f"plan written to {made.path}")
        if made.plan.invalid:
            first = made.plan.invalid[0]
            err.print(f"{len(made.plan.invalid)} invalid line(s), kept as error records; the first: "
                      f"line {first.line}: {first.message}", highlight=False)


def _show_plan(path: Path, *, groups: int, json: bool) -> None:
    from batchrun.model.spec import resolve_model
    from batchrun.plan_view import plan_summary_json, render_plan_groups, render_plan_summary
    from batchrun.planfile import load_plan
    from batchrun.tokenizer import load_tokenizer

    shown = load_plan(path)
    if json:
        _print_json(plan_summary_json(shown.header))
        return
    render_plan_summary(out, shown.header, title=f"plan {path}")
    render_plan_groups(out, shown, load_tokenizer(resolve_model(shown.header.model_path)), limit=groups)


def _one_input(argument: Path | None, option: Path | None) -> Path | None:
    if argument is not None and option is not None:
        raise UserError(f"two inputs given: {argument} and --input {option}; give one", exit_code=EXIT_USAGE)
    return argument if argument is not None else option


def _planner_config(kv_budget: str | None, min_prefix_len: int | None, max_levels: int | None,
                    share: bool | None, *, always: bool) -> PlannerConfig | None:
    """The planning options given (defaults for the rest); None when none was given and `always` is false."""
    from batchrun.api import planner_config

    given = {k: v for k, v in dict(kv_budget=kv_budget, min_prefix_len=min_prefix_len, max_levels=max_levels,
                                   share=share).items() if v is not None}
    return planner_config(**given) if given or always else None


@app.command()
@user_errors
def run(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL: one line per request, appended "
                                         "as each finishes; run again to resume.", show_default=False)],
    source: Annotated[Path | None, typer.Argument(help="A plan made by `batchrun plan`, or an input JSONL: then "
                                                  "it is planned first, into OUT.plan beside the output, and "
                                                  "the same command resumes.", show_default=False)] = None,
    plan_path: Annotated[Path | None, typer.Option("--plan", "-p", help="The plan made by `batchrun plan` (or "
                                                   "give it as SOURCE).", show_default=False)] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="An input JSONL to plan and run ('-': "
                                               "standard input); with a plan: the plan's input, found elsewhere "
                                               "than the plan records.", show_default=False)] = None,
    errors: Annotated[Path | None, typer.Option("--errors", help="Write error lines here [default: OpenAI-format "
                                                "input: OUT.errors.jsonl beside the output, as the OpenAI Batch "
                                                "API keeps an error file; plain input: into the output].",
                                                show_default=False)] = None,
    ordered: Annotated[bool, typer.Option("--ordered", help="Write lines in input order (lines that finish "
                                          "early are held until the earlier ones are written).")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="With a plan: another copy of the plan's "
                                              "model [default: the model the plan names]. With an input: as "
                                              f"`plan --model` [default: {defaults.BUILTIN_MODEL}].",
                                              show_default=False)] = None,
    min_prefix_len: MinPrefixOption = None,
    max_levels: MaxLevelsOption = None,
    share: ShareOption = None,
    dtype: DtypeOption = None,
    download: DownloadOption = False,
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
                                           "weights are loaded. When run plans an input, a size also shapes "
                                           "the plan's batches (as plan --kv-budget); a plan's own budget only "
                                           "shaped its batches.")] = defaults.RUN_KV_BUDGET,
    max_step_tokens: Annotated[int, typer.Option(min=1, help="Tokens one step computes: every running request's "
                                                 "decode token, then prefill chunks up to this.")]
    = defaults.MAX_STEP_TOKENS,
    json: JsonOption = False,
) -> None:
    """Execute a plan (or plan an input, then execute it): each shared prefix computed once, every result
    appended to the output as it finishes."""
    from batchrun.api import run_job

    if (workers is not None or ray_address is not None) and (
            kv_budget != defaults.RUN_KV_BUDGET or max_step_tokens != defaults.MAX_STEP_TOKENS):
        raise UserError("--kv-budget and --max-step-tokens apply to a single-process run; with --workers "
                        "each worker runs with the plan's budget", exit_code=EXIT_USAGE)
    outcome = run_job(source, output, plan=plan_path, input=input, errors=errors, model=model, dtype=dtype,
                      config=_planner_config(None, min_prefix_len, max_levels, share, always=False),
                      device=device, threads=threads, workers=workers, ray_address=ray_address, download=download,
                      console=err, is_ordered=ordered, kv_budget=kv_budget, max_step_tokens=max_step_tokens)
    summary = {"requests": outcome.num_requests, "resumed": outcome.num_resumed,
               "completed": outcome.num_completed, "failed": outcome.num_failed,
               "output_tokens": outcome.output_tokens, "wall_seconds": round(outcome.wall_seconds, 3),
               "output": str(output), "errors": None if outcome.errors_path is None else str(outcome.errors_path)}
    if json:
        _print_json(summary)
    else:
        out.print(f"{outcome.num_completed} completed, {outcome.num_failed} failed, {outcome.num_resumed} "
                  f"already done; {outcome.output_tokens} output tokens in {outcome.wall_seconds:.1f}s → "
                  f"{output}", highlight=False, soft_wrap=True)
        if outcome.errors_path is not None:
            out.print(f"error lines → {outcome.errors_path}", highlight=False, soft_wrap=True)
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
