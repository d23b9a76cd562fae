"""`zephyr generate`: teacher models write dSFT dialogues from seeds, resumably.

The seeds (`GenerateConfig.seeds`: one JSONL file, or a folder whose `*.jsonl` files are read in name order)
are put in a seeded order and the first `num_prompts` kept. Seeds whose dialogue is already in
`output_dir/dialogues.jsonl` are skipped; the rest are cut into chunks (the teacher's `batch_size`, or
`max_concurrency` for an HTTP teacher), and all dialogues of a chunk advance together: one `generate` call
per step (an answer, a refinement, a user turn) for every dialogue still going, so that the local backend
batches them and the HTTP backend sends them concurrently.

Models are scheduled model-major (`zephyr.generation.schedule`): one local model is loaded at a time. When
the teacher and the user simulator are two different local models, an UltraChat dialogue needs both every
turn, so the chunk is every dialogue of the run: all of them get their assistant turn from the teacher,
then the teacher is released and the simulator loaded for all of their user turns, and so on; each model
loads once per turn (2 × max_turns loads in all, however many dialogues), never two at once. One model on
both sides (the default), or HTTP models, need no swapping and keep the chunks above.

Local models' answers are stored in `output_dir/cache/answers.sqlite` as each call ends (`GeneratorConfig.
cache`), HTTP ones in the run's request cache (`RUN/cache/requests.sqlite`): a killed run's rerun replays
the turns already answered from them and asks only the rest.

Outputs in `output_dir`:
- `dialogues.jsonl`: the conversations schema plus metadata, one record appended (and synced) as each
  dialogue finishes; a crash loses only the dialogues in flight, and a rerun writes each prompt_id once;
- `failures.jsonl`: dialogues that produced nothing usable, with the reason (a rerun tries them again);
- `resolved_config.yaml`, and `summary.json` with the counts of the last run;
- `cache/answers.sqlite`: the local models' answers (above).

Strategies are described in `zephyr.stages.generate.strategies` and docs/generation.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from zephyr import io
from zephyr.core.config import GenerateConfig, GeneratorConfig, save_resolved, to_dict
from zephyr.core.errors import ConfigError, DataError
from zephyr.data.schema import validate_conversation
from zephyr.generation import make_generator
from zephyr.generation.base import (
    Completion,
    Generator,
    Request,
    RequestGenerator,
    SamplingParams,
    parse_spec,
)
from zephyr.generation.cache import CachedGenerator, ResponseCache
from zephyr.generation.schedule import Resident, answers_id, backend_options, builder, is_local, load_key
from zephyr.stages import stage
from zephyr.stages.generate.strategies import (
    Seed,
    check_seed,
    clean_user_turn,
    compose_prompt,
    dialogue_id,
    draw_turns,
    order_key,
    parse_refined_instruction,
    refine_request,
    sampling_seed,
    seed_from_record,
    user_simulator_system_prompt,
    user_simulator_view,
)

DIALOGUES = stage("generate").output("dialogues")  # the stage table declares the outputs
FAILURES = "failures.jsonl"
SUMMARY = stage("generate").output("summary")
# The simulator sometimes goes on to write the assistant's reply itself; stop it there.
_SIMULATOR_STOP = ("\nAssistant:", "\nAI:")


# ---------------------------------------------------------------------------------------------------------
# Seeds


def read_seeds(path: str | os.PathLike) -> list[Seed]:
    """The seeds of a JSONL file, or of every `*.jsonl` file of a folder (name order), validated.

    Errors name `FILE:LINE: field: problem`; ids and contents must be unique across all files.
    """
    source = Path(path)
    if source.is_dir():
        files = sorted(source.glob("*.jsonl"))
        if not files:
            raise DataError(f"{source}: no *.jsonl seed files in this folder")
    elif source.is_file():
        files = [source]
    else:
        raise DataError(f"{source}: no such seed file or folder")
    seeds: list[Seed] = []
    ids: dict[str, str] = {}
    contents: dict[tuple, str] = {}
    for file in files:
        for line, record in _jsonl_lines(file):
            problems = check_seed(record)
            if problems:
                raise DataError(f"{file}:{line}: {problems[0].field}: {problems[0].message}")
            seed = seed_from_record(record)
            where = f"{file}:{line}"
            if seed.id in ids:
                raise DataError(f"{where}: id: {seed.id!r} is also the id of {ids[seed.id]}")
            content = (seed.sector, seed.text, seed.material)
            if content in contents:
                raise DataError(f"{where}: text: the same seed as {contents[content]}")
            ids[seed.id], contents[content] = where, where
            seeds.append(seed)
    if not seeds:
        raise DataError(f"{source}: no seeds (the file is empty)")
    return seeds


def _jsonl_lines(file: Path) -> list[tuple[int, Any]]:
    rows = []
    data = file.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError:
            raise DataError(f"{file}:{line}: record: not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{line}: record: invalid JSON: {exc.msg} at column {exc.colno}") from None
    return rows


def select_seeds(seeds: Sequence[Seed], cfg: GenerateConfig) -> list[tuple[str, Seed]]:
    """(prompt_id, seed) of the run, in its seeded order, the first `num_prompts` of them."""
    items = [(dialogue_id(seed, cfg.strategy), seed) for seed in seeds]
    items.sort(key=lambda item: order_key(cfg.seed, item[0]))
    return items[: cfg.num_prompts] if cfg.num_prompts is not None else items


# ---------------------------------------------------------------------------------------------------------
# Generators


def build_generator(gen: GeneratorConfig) -> Generator:
    """The backend for a generator config, with the options that backend takes (no request cache)."""
    return make_generator(gen.model, **backend_options(gen))


def sampling_params(gen: GeneratorConfig, stop: Sequence[str] = ()) -> SamplingParams:
    return SamplingParams(
        max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p, stop=tuple(stop)
    )


def _chunk_size(gen: GeneratorConfig) -> int:
    """Dialogues per call: what the backend runs at once (vLLM schedules its own batches: a large call)."""
    backend = parse_spec(gen.model).backend
    return {"openai": gen.max_concurrency, "vllm": VLLM_CALL}.get(backend, gen.batch_size)


ANSWERS = "cache/answers.sqlite"  # the local models' answers: a killed run continues from them
VLLM_CALL = 1024  # conversations per call to a vLLM engine


# ---------------------------------------------------------------------------------------------------------
# Summary


@dataclass
class GenerateSummary:
    """What one `run_generate` did. `written` counts dialogues, `records` the lines they took."""

    output_dir: Path
    strategy: str
    selected: int  # seeds in the run (after num_prompts)
    skipped: int = 0  # dialogues already in dialogues.jsonl
    written: int = 0
    records: int = 0
    failed: int = 0
    stopped_early: int = 0  # written with fewer turns / rounds than planned
    refine_fallbacks: int = 0  # self_instruct: refinements that gave no new instruction (x kept)
    truncated_answers: int = 0  # assistant turns cut by max_tokens
    calls: int = 0  # generate calls (one per step of a chunk)
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # generation time, model loading excluded

    @property
    def complete(self) -> bool:
        """Every selected seed has its dialogue (nothing failed)."""
        return self.skipped + self.written == self.selected

    def throughput_line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (
            f"throughput: {self.written / seconds:.3f} dialogues/s, "
            f"{self.completion_tokens / seconds:.1f} tokens/s generated "
            f"({self.completion_tokens} tokens in {self.seconds:.1f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["complete"] = self.complete
        return out


def format_summary(s: GenerateSummary) -> str:
    lines = [
        f"generate {s.strategy} -> {s.output_dir / DIALOGUES}",
        f"  seeds {s.selected}: {s.skipped} done before, {s.written} written ({s.records} records), "
        f"{s.failed} failed",
        f"  stopped early {s.stopped_early}, truncated answers {s.truncated_answers}"
        + (
            f", refinements kept the instruction {s.refine_fallbacks}"
            if s.strategy == "self_instruct"
            else ""
        ),
        f"  {s.calls} generate calls, {s.completions} completions, "
        f"tokens: {s.prompt_tokens} prompt, {s.completion_tokens} generated",
    ]
    if s.failed:
        lines.append(f"  failures: {s.output_dir / FAILURES} (a rerun tries them again)")
    lines.append(s.throughput_line())  # last: scripts read the throughput from the final line
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The run


def run_generate(
    cfg: GenerateConfig, *, teacher: Generator | None = None, user_simulator: Generator | None = None
) -> GenerateSummary:
    """Write the dialogues of `cfg` (module docstring); prints a summary and returns it.

    `teacher` / `user_simulator` replace the generators built from the config (an embedding program's own).
    """
    seeds = read_seeds(cfg.seeds)
    items = select_seeds(seeds, cfg)
    out = io.check_output_dir(cfg.output_dir)  # before any teacher loads: unwritable or full fails now
    done = _done_ids(out / DIALOGUES)
    if done:
        _check_same_recipe(cfg, out)
    todo = [(pid, seed) for pid, seed in items if pid not in done]
    save_resolved(cfg, out)
    summary = GenerateSummary(out, cfg.strategy, selected=len(items), skipped=len(items) - len(todo))
    print(
        f"generate {cfg.strategy}: {len(items)} seeds from {cfg.seeds}, {summary.skipped} done before, "
        f"{len(todo)} to write -> {out}",
        flush=True,
    )
    if todo:
        resident = Resident(builder(out), key=partial(load_key, output_dir=out))
        answers = ResponseCache(out / ANSWERS)
        try:
            teacher_ = teacher or _scheduled(cfg.teacher, resident, answers)
            simulator = None
            if cfg.strategy == "ultrachat":
                simulator = user_simulator or _simulator_for(cfg, teacher_, resident, answers)
            swaps = _swaps(cfg) and teacher is None and user_simulator is None
            run = _Run(cfg, out, done, summary, teacher_, simulator, wave=len(todo) if swaps else None)
            run.generate(todo)
        finally:
            resident.close()
            answers.close()
    _write_summary(out / SUMMARY, summary)
    print(format_summary(summary), flush=True)
    return summary


def _scheduled(gen: GeneratorConfig, resident: Resident, answers: ResponseCache) -> Generator:
    """A config's generator under the schedule: a local one loads when a call misses the stored answers
    (releasing the other model), an HTTP one is built now."""
    if not is_local(gen):
        return resident.get(gen)
    return CachedGenerator(
        partial(resident.get, gen), answers if gen.cache else None, model_id=answers_id(gen)
    )


def _simulator_for(
    cfg: GenerateConfig, teacher: Generator, resident: Resident, answers: ResponseCache
) -> Generator:
    sim = cfg.user_simulator
    if sim is None or (resident.key(sim) == resident.key(cfg.teacher) and sim.cache == cfg.teacher.cache):
        return teacher  # one model in memory, not two
    return _scheduled(sim, resident, answers)


def _swaps(cfg: GenerateConfig) -> bool:
    """Whether an UltraChat run alternates two local models (a model swap every turn)."""
    sim = cfg.user_simulator
    if cfg.strategy != "ultrachat" or sim is None or not (is_local(sim) and is_local(cfg.teacher)):
        return False
    return load_key(sim) != load_key(cfg.teacher)


def _done_ids(path: Path) -> set[str]:
    done = set()
    for i, record in enumerate(io.read_jsonl_resumable(path), start=1):
        if not isinstance(record, dict) or not isinstance(record.get("prompt_id"), str):
            raise DataError(f"{path}: record {i}: prompt_id: missing (not a file zephyr generate wrote?)")
        done.add(record["prompt_id"])
    return done


def _shaping(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape a run's dialogues: a resumed run must use the same ones."""
    keys = {"strategy": cfg.get("strategy"), "seed": cfg.get("seed")}
    roles = ["teacher"]
    if cfg.get("strategy") == "self_instruct":
        keys |= {"rounds": cfg.get("rounds"), "keep_all_rounds": cfg.get("keep_all_rounds")}
    else:
        keys |= {"min_turns": cfg.get("min_turns"), "max_turns": cfg.get("max_turns")}
        roles.append("user_simulator")
    for role in roles:
        gen = cfg.get(role)
        if gen is None:  # the simulator defaults to the teacher's model, with its own system prompt
            gen = {**(cfg.get("teacher") or {}), "system_prompt": None}
        for name in ("model", "system_prompt", "temperature", "top_p", "max_tokens"):
            keys[f"{role}.{name}"] = gen.get(name)
    return keys


def _check_same_recipe(cfg: GenerateConfig, out: Path) -> None:
    saved_path = out / "resolved_config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{saved_path}: not valid YAML: {exc}") from None
    before, now = _shaping(saved), _shaping(to_dict(cfg))
    changed = [f"{k} ({before.get(k)!r} -> {v!r})" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise ConfigError(
            f"{out / DIALOGUES} holds dialogues made with other settings: {', '.join(changed)}; "
            f"use another output_dir, or remove {out / DIALOGUES} to start over"
        )


def _write_summary(path: Path, summary: GenerateSummary) -> None:
    io.write_text(path, json.dumps(summary.to_dict(), indent=2) + "\n")


@dataclass
class _Dialogue:
    """A dialogue in flight. `messages` holds user/assistant turns only (the teacher's system prompt is an
    instruction to the teacher, not part of the dSFT data)."""

    prompt_id: str
    seed: Seed
    messages: list[dict[str, str]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # of the assistant turns
    target_turns: int = 0  # ultrachat
    instruction: str = ""  # self_instruct: the instruction part of the current x
    rounds: list[dict[str, Any]] = field(default_factory=list)  # self_instruct: finished (x_j, y_j)
    refine_fallbacks: int = 0
    stopped: str | None = None
    active: bool = True


class _Run:
    """One run's state: generators, outputs, counters, and the chunk loop of each strategy."""

    def __init__(
        self,
        cfg: GenerateConfig,
        out: Path,
        done: set[str],
        summary: GenerateSummary,
        teacher: Generator,
        simulator: Generator | None,
        wave: int | None = None,
    ):
        self.cfg = cfg
        self.wave = wave  # dialogues advanced together (None: the teacher's chunk)
        self.out = out
        self.done = done
        self.summary = summary
        self.teacher = teacher
        self.simulator = simulator
        self.teacher_params = sampling_params(cfg.teacher)
        sim_cfg = cfg.user_simulator or cfg.teacher
        self.simulator_params = sampling_params(sim_cfg, stop=_SIMULATOR_STOP)
        self.simulator_label = sim_cfg.label
        self.progress: Any = None

    def generate(self, todo: list[tuple[str, Seed]]) -> None:
        from tqdm.auto import tqdm

        step = self.wave or _chunk_size(self.cfg.teacher)
        chunk_runner = self._self_instruct if self.cfg.strategy == "self_instruct" else self._ultrachat
        start = time.perf_counter()
        with tqdm(total=len(todo), unit="dialogue", desc="generate", disable=None, file=sys.stderr) as bar:
            self.progress = bar
            try:
                for i in range(0, len(todo), step):
                    chunk_runner([_Dialogue(pid, seed) for pid, seed in todo[i : i + step]])
            finally:
                self.summary.seconds = time.perf_counter() - start

    # -----------------------------------------------------------------------------------------------------
    # Model calls

    def _complete(
        self,
        generator: Generator,
        dialogues: list[_Dialogue],
        conversations: list,
        params: SamplingParams,
        step: str,
    ) -> list[Completion]:
        """The completions of `conversations` (one per dialogue), in calls of the teacher's chunk: with a
        wave of every dialogue, each call's answers are stored as it ends."""
        size = _chunk_size(self.cfg.teacher) if self.wave else len(conversations)
        completions: list[Completion] = []
        for i in range(0, len(conversations), max(size, 1)):
            part = slice(i, i + size)
            completions += self._call(generator, dialogues[part], conversations[part], params, step)
        return completions

    def _call(
        self,
        generator: Generator,
        dialogues: list[_Dialogue],
        conversations: list,
        params: SamplingParams,
        step: str,
    ) -> list[Completion]:
        """One call for all `conversations` (one per dialogue). Backends that take per-request parameters
        get a sampling seed per dialogue, so a dialogue samples the same whatever chunk it is in."""
        if isinstance(generator, RequestGenerator):
            requests = [
                Request(conv, replace(params, seed=sampling_seed(self.cfg.seed, d.prompt_id, step)))
                for d, conv in zip(dialogues, conversations, strict=True)
            ]
            grouped = generator.generate_requests(requests)
            completions = [
                g[0] if g else Completion.failed("the backend returned no completion") for g in grouped
            ]
        else:
            completions = generator.generate(
                conversations, replace(params, seed=sampling_seed(self.cfg.seed, "", step))
            )
        if len(completions) != len(conversations):
            raise RuntimeError(
                f"{generator.model_id}: {len(completions)} completions for {len(conversations)} conversations"
            )
        s = self.summary
        s.calls += 1
        s.completions += len(completions)
        s.prompt_tokens += sum(c.prompt_tokens for c in completions)
        s.completion_tokens += sum(c.completion_tokens for c in completions)
        return completions

    def _teacher_view(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        system = self.cfg.teacher.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + messages

    def _answers(
        self, dialogues: list[_Dialogue], conversations: list, step: str
    ) -> list[tuple[str, str, str]]:
        """The teacher's answers as (text, problem, finish_reason); problem is "" for a usable answer."""
        completions = self._complete(self.teacher, dialogues, conversations, self.teacher_params, step)
        answers: list[tuple[str, str, str]] = []
        for c in completions:
            text = c.text.strip()
            problem = _problem(c, text)
            if not problem and c.finish_reason == "length":
                self.summary.truncated_answers += 1
            answers.append((text, problem, c.finish_reason))
        return answers

    # -----------------------------------------------------------------------------------------------------
    # self_instruct

    def _self_instruct(self, dialogues: list[_Dialogue]) -> None:
        for d in dialogues:
            d.instruction = d.seed.text
        for j in range(self.cfg.rounds + 1):
            live = [d for d in dialogues if d.active]
            if not live:
                return
            if j > 0:
                self._refine(live, j)
            prompts = [compose_prompt(d.instruction, d.seed.material) for d in live]
            conversations = [self._teacher_view([{"role": "user", "content": x}]) for x in prompts]
            answers = self._answers(live, conversations, f"answer-{j}")
            for d, x, (y, problem, finish) in zip(live, prompts, answers, strict=True):
                if problem:
                    self._end_early(d, f"answer {j}: {problem}")
                    continue
                d.rounds.append(
                    {
                        "round": j,
                        "prompt": x,
                        "answer": y,
                        "finish_reason": finish,
                        "fallbacks": d.refine_fallbacks,
                    }
                )
        for d in dialogues:
            if d.active:
                self._finish(d)

    def _refine(self, live: list[_Dialogue], j: int) -> None:
        conversations = [
            self._teacher_view(refine_request(d.instruction, d.rounds[-1]["answer"], d.seed.material))
            for d in live
        ]
        completions = self._complete(self.teacher, live, conversations, self.teacher_params, f"refine-{j}")
        for d, c in zip(live, completions, strict=True):
            truncated = c.finish_reason == "length"
            new = parse_refined_instruction(c.text, d.instruction, truncated=truncated) if c.ok else None
            if new is None:
                d.refine_fallbacks += 1  # keep x: the next answer is a fresh sample for the same instruction
                self.summary.refine_fallbacks += 1
            else:
                d.instruction = new

    def _self_instruct_records(self, d: _Dialogue) -> list[dict[str, Any]]:
        """The final pair under the dialogue's prompt_id; with keep_all_rounds the earlier pairs first, under
        prompt_id-r{round}. The final record is written last: its presence marks the dialogue done."""
        kept = d.rounds if self.cfg.keep_all_rounds else d.rounds[-1:]
        records = []
        for i, pair in enumerate(kept):
            final = i == len(kept) - 1
            records.append(
                {
                    "prompt_id": d.prompt_id if final else f"{d.prompt_id}-r{pair['round']}",
                    "prompt": pair["prompt"],
                    "messages": [
                        {"role": "user", "content": pair["prompt"]},
                        {"role": "assistant", "content": pair["answer"]},
                    ],
                    **self._metadata(d),
                    "round": pair["round"],
                    "final": final,
                    "seed_prompt": d.rounds[0]["prompt"],
                    "refine_fallbacks": pair["fallbacks"],
                    "finish_reason": pair["finish_reason"],
                    "stopped": d.stopped,
                }
            )
        return records

    # -----------------------------------------------------------------------------------------------------
    # ultrachat

    def _ultrachat(self, dialogues: list[_Dialogue]) -> None:
        cfg = self.cfg
        custom = cfg.user_simulator.system_prompt if cfg.user_simulator is not None else None
        for d in dialogues:
            d.target_turns = draw_turns(d.prompt_id, cfg.seed, cfg.min_turns, cfg.max_turns)
            d.messages = [{"role": "user", "content": compose_prompt(d.seed.text, d.seed.material)}]
        turn = 1
        while live := [d for d in dialogues if d.active]:
            answers = self._answers(live, [self._teacher_view(d.messages) for d in live], f"assistant-{turn}")
            for d, (text, problem, finish) in zip(live, answers, strict=True):
                if problem:
                    self._end_early(d, f"assistant turn {turn}: {problem}")
                    continue
                d.messages.append({"role": "assistant", "content": text})
                d.finish_reasons.append(finish)
                if turn == d.target_turns:
                    self._finish(d)
            live = [d for d in dialogues if d.active]
            if not live:
                return
            turn += 1
            views = [
                user_simulator_view(d.messages, user_simulator_system_prompt(d.seed.sector, custom))
                for d in live
            ]
            assert self.simulator is not None
            completions = self._complete(self.simulator, live, views, self.simulator_params, f"user-{turn}")
            for d, c in zip(live, completions, strict=True):
                text = clean_user_turn(c.text) if c.ok else ""
                problem = _problem(c, text)
                if problem:
                    self._end_early(d, f"user turn {turn}: {problem}")
                else:
                    d.messages.append({"role": "user", "content": text})

    def _ultrachat_records(self, d: _Dialogue) -> list[dict[str, Any]]:
        return [
            {
                "prompt_id": d.prompt_id,
                "prompt": d.messages[0]["content"],
                "messages": d.messages,
                **self._metadata(d),
                "user_simulator": self.simulator_label,
                "turns": len(d.finish_reasons),
                "target_turns": d.target_turns,
                "finish_reasons": d.finish_reasons,
                "stopped": d.stopped,
            }
        ]

    # -----------------------------------------------------------------------------------------------------
    # Finishing dialogues

    def _metadata(self, d: _Dialogue) -> dict[str, Any]:
        return {
            "strategy": self.cfg.strategy,
            "seed_id": d.seed.id,
            "sector": d.seed.sector,
            "teacher": self.cfg.teacher.label,
        }

    def _end_early(self, d: _Dialogue, reason: str) -> None:
        """A step failed: keep what the dialogue has when it holds a complete exchange, else it failed."""
        has_answer = bool(d.rounds) if self.cfg.strategy == "self_instruct" else bool(d.finish_reasons)
        if not has_answer:
            self._fail(d, reason)
            return
        d.stopped = reason
        # An ultrachat dialogue ends with the assistant: drop a user turn left without its answer.
        if d.messages and d.messages[-1]["role"] == "user" and len(d.messages) > 1:
            d.messages.pop()
        self._finish(d)

    def _finish(self, d: _Dialogue) -> None:
        d.active = False
        records = (
            self._self_instruct_records(d)
            if self.cfg.strategy == "self_instruct"
            else self._ultrachat_records(d)
        )
        path = self.out / DIALOGUES
        for record in records:
            if record["prompt_id"] in self.done:  # written before a crash that interrupted this dialogue
                continue
            problems = validate_conversation(record)
            if problems:  # a bug here, never bad input: the record is made from checked parts
                raise RuntimeError(f"generated record {record['prompt_id']}: {problems[0]}")
            io.append_jsonl(path, record)
            self.done.add(record["prompt_id"])
            self.summary.records += 1
        self.summary.written += 1
        self.summary.stopped_early += d.stopped is not None
        self._advance()

    def _fail(self, d: _Dialogue, reason: str) -> None:
        d.active = False
        failure = {"prompt_id": d.prompt_id, **self._metadata(d), "reason": reason}
        io.append_jsonl(self.out / FAILURES, failure)
        self.summary.failed += 1
        self._advance()

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(written=self.summary.written, failed=self.summary.failed, refresh=False)


def _problem(completion: Completion, text: str) -> str:
    """Why a completion cannot be used as a turn ("" when it can)."""
    if not completion.ok:
        return f"error: {completion.error or 'unknown'}"
    if not text:
        return f"empty ({completion.finish_reason})"
    return ""
