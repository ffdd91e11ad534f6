"""batchrun as a library: `generate` for requests held in memory (a notebook), and the calls behind
`batchrun plan`, `run` and `stats` for scripts. Re-exported by `batchrun/__init__.py` on first use, so
`import batchrun` stays cheap; torch loads only when a model runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from rich.console import Console

from batchrun import defaults
from batchrun.errors import EXIT_USAGE, UserError
from batchrun.job import STDIN, ensure_job_plan, job_source, spool_stdin
from batchrun.planner import PlannerConfig
from batchrun.sizes import parse_size

if TYPE_CHECKING:
    from batchrun.output import Completion
    from batchrun.plan import Plan
    from batchrun.requests import InvalidLine, Request
    from batchrun.runner import RunOutcome
    from batchrun.stats import Report


class Result(NamedTuple):
    """One request's result. A failed request (a bad request, a prompt too long) has `error` set and no text."""

    id: str | None
    text: str | None
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length" (max_tokens); None on error
    prompt_tokens: int
    error: str | None  # "code: message"


def generate(requests: Iterable[str | Mapping[str, Any]], *, model: str = defaults.BUILTIN_MODEL,
             dtype: str | None = None, config: PlannerConfig | None = None, device: str = defaults.DEVICE,
             threads: int | None = None, download: bool = False, workdir: str | Path | None = None,
             **sampling: Any) -> list[Result]:
    """Results of `requests` in their order: each a prompt string or a request object as a plain input line
    takes it (`prompt` or `messages`, sampling fields, `id`). `sampling` (max_tokens=..., temperature=...)
    fills the fields a request leaves out. Planned and run in this process by the same engine as `batchrun
    run`; the input and plan are written to `workdir` when given, else to a temporary folder removed after."""
    from batchrun.model.spec import resolve_model
    from batchrun.planning import plan_to_file
    from batchrun.runner import prepare_engine
    from batchrun.tokenizer import load_tokenizer

    lines = [{**sampling, **({"prompt": r} if isinstance(r, str) else r)} for r in requests]
    if not lines:
        return []
    with ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        input_path = folder / "input.jsonl"
        input_path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        spec = resolve_model(model, dtype=dtype, download=download)
        tokenizer = load_tokenizer(spec)
        plan = plan_to_file(input_path, folder / "input.plan", spec=spec, tokenizer=tokenizer,
                            config=config or planner_config())
        collector = _Collector(len(lines))
        for record in plan.invalid:
            collector.write_error(record)
        prepare_engine(plan, spec, tokenizer, device=device, threads=threads).engine.run(collector)
    return collector.in_order()


class _Collector:
    """The engine's writer for `generate`: results kept in memory, by input line (line i + 1 is request i)."""

    def __init__(self, num_lines: int) -> None:
        self.results: list[Result | None] = [None] * num_lines

    def write_completion(self, request: Request, completion: Completion) -> None:
        self.results[request.line - 1] = Result(request.id, completion.text, list(completion.token_ids),
                                                completion.finish_reason, completion.prompt_tokens, None)

    def write_error(self, record: Request | InvalidLine, *, code: str | None = None,
                    message: str | None = None) -> None:
        code = code or getattr(record, "code", None)
        message = message or getattr(record, "message", None)
        self.results[record.line - 1] = Result(record.id, None, [], None, 0, f"{code}: {message}")

    def in_order(self) -> list[Result]:
        assert all(r is not None for r in self.results), "a request got no result"
        return list(self.results)  # type: ignore[arg-type]


class MadePlan(NamedTuple):
    plan: Plan
    path: Path  # where the plan was written


def planner_config(*, kv_budget: str | int = defaults.KV_BUDGET, min_prefix_len: int = defaults.MIN_PREFIX_LEN,
                   max_levels: int = defaults.MAX_LEVELS, share: bool = True) -> PlannerConfig:
    """The planning options as `batchrun plan` takes them (`kv_budget` as bytes or a size such as '4GiB')."""

    budget = kv_budget if isinstance(kv_budget, int) else parse_size(kv_budget)
    return PlannerConfig(kv_budget_bytes=budget, min_prefix_len=min_prefix_len, max_levels=max_levels, share=share)


def stdin_copy_path(output: Path) -> Path:
    """Where input read from standard input is kept: beside what is written from it (OUT.input.jsonl)."""
    return output.with_name(output.name + ".input.jsonl")


def make_plan(input: str | Path, output: str | Path | None = None, *, model: str = defaults.BUILTIN_MODEL,
              dtype: str | None = None, config: PlannerConfig | None = None, download: bool = False,
              chat_template: str | Path | None = None) -> MadePlan:
    """`batchrun plan`: plans `input` ('-': standard input, kept beside the plan) into `output` (default:
    INPUT with the suffix .plan). `model`: a built-in name, a directory, or a Hub id from the Hugging Face
    cache (`download`: fetched when absent); `chat_template`: a Jinja template file instead of the model's."""
    from batchrun.model.spec import resolve_model
    from batchrun.planning import plan_to_file, read_chat_template
    from batchrun.tokenizer import load_tokenizer

    template = read_chat_template(_path(chat_template))
    input_path, target = Path(input), None if output is None else Path(output)
    if str(input) == STDIN:
        if target is None:
            raise UserError("planning standard input needs -o PLAN (the input is kept beside the plan)",
                            exit_code=EXIT_USAGE)
        input_path = spool_stdin(stdin_copy_path(target))
    target = target or input_path.with_suffix(".plan")
    spec = resolve_model(model, dtype=dtype, download=download)
    plan = plan_to_file(input_path, target, spec=spec, tokenizer=load_tokenizer(spec),
                        config=config or planner_config(), chat_template=template)
    return MadePlan(plan, target)


def run_job(source: str | Path | None, output: str | Path, *, plan: str | Path | None = None,
            input: str | Path | None = None, errors: str | Path | None = None, model: str | None = None,
            dtype: str | None = None, config: PlannerConfig | None = None, device: str = defaults.DEVICE,
            threads: int | None = None, workers: int | None = None, ray_address: str | None = None,
            download: bool = False, console: Console | None = None, is_ordered: bool = False,
            kv_budget: str = defaults.RUN_KV_BUDGET, max_step_tokens: int = defaults.MAX_STEP_TOKENS) -> RunOutcome:
    """`batchrun run`: runs a plan (`source` or `plan`; `input` then overrides the input it records), or plans
    an input (`source` or `input`) into OUT.plan beside the output and runs that; the same call resumes.
    `download`: a Hub model absent from the Hugging Face cache is fetched into it first; `is_ordered`: lines
    in input order; `kv_budget`: the run's KV memory ("auto": sized from the machine; a size also shapes the
    batches of a plan made here); `max_step_tokens`: tokens one engine step computes."""
    console = console or Console(stderr=True, soft_wrap=True)
    output = Path(output)
    if output.is_dir():
        raise UserError(f"{output} is a directory: give the output file's name (e.g. {output / 'out.jsonl'})",
                        exit_code=EXIT_USAGE)
    found = job_source(_path(source), plan_path=_path(plan), input_path=_path(input))
    if found.plan_path is not None:
        if dtype is not None or config is not None:
            raise UserError("planning options (--dtype, --kv-budget, --min-prefix-len, --max-levels, --share) "
                            f"apply when run plans an input, not to the plan {found.plan_path}", exit_code=EXIT_USAGE)
        plan_path, input_path = found.plan_path, found.input_path
        if download:  # into the cache now: every later lookup finds it there, offline
            from batchrun.model.spec import resolve_model
            from batchrun.planfile import load_plan_header

            resolve_model(model or load_plan_header(plan_path).model_path, download=True)
    else:
        assert found.input_path is not None
        input_path = found.input_path
        if str(input_path) == STDIN:
            input_path = spool_stdin(stdin_copy_path(output))
        config = config or planner_config()
        if kv_budget != defaults.RUN_KV_BUDGET:
            config = dataclasses.replace(config, kv_budget_bytes=parse_size(kv_budget))
        plan_path = _job_plan(input_path, output, model=model or defaults.BUILTIN_MODEL, dtype=dtype,
                              config=config, download=download, console=console)
        model = None  # the plan names it
    kwargs = dict(errors_path=_path(errors), model=model, device=device, console=console, input_path=input_path,
                  is_ordered=is_ordered)
    if workers is not None or ray_address is not None:
        from batchrun.distributed.driver import run_distributed

        return run_distributed(plan_path, output, workers=workers, ray_address=ray_address, **kwargs)
    from batchrun.runner import run_plan_file

    return run_plan_file(plan_path, output, threads=threads, kv_budget=kv_budget, max_step_tokens=max_step_tokens,
                         **kwargs)


def _job_plan(input_path: Path, output: Path, *, model: str, dtype: str | None, config: PlannerConfig,
              download: bool, console: Console) -> Path:
    from batchrun.model.spec import resolve_model
    from batchrun.planning import plan_to_file
    from batchrun.tokenizer import load_tokenizer

    spec = resolve_model(model, dtype=dtype, download=download)

    def make(target: Path) -> None:
        console.print(f"planning {input_path} into {target}", highlight=False)
        plan_to_file(input_path, target, spec=spec, tokenizer=load_tokenizer(spec), config=config)

    return ensure_job_plan(input_path, output, spec=spec, config=config, make_plan=make,
                           note=lambda text: console.print(text, highlight=False))


def job_stats(paths: list[str | Path]) -> list[Report]:
    """`batchrun stats`: the report of each output file (its metrics file beside it read too)."""
    from batchrun.stats import load_report

    return [load_report(Path(p)) for p in paths]


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
