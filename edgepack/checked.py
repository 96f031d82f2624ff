"""Checked steps: a transformation of the model is kept only when what it wrote still loads and agrees.

Rules:
1. A step runs with third-party output held back (stdout, stderr, Python logging, onnxruntime's logger):
   onnxruntime's quantization pre-processing logs "ONNX Runtime Model Optimization Failed!" and a
   traceback at ERROR level, and onnx-ir logs per node; none of it reaches edgepack's output.
2. What a step wrote must load in onnxruntime (CPU provider) and, on check inputs fitted to the model
   (edgepack.inputs), give the outputs of the model before it: cosine >= ``MIN_COSINE`` and max abs
   error <= ``ABS_TOLERANCE`` x (1 + the largest output). Without check inputs it must load.
3. Known damage is repaired before the check: a subgraph output that is an outer-scope value returned
   directly (onnx-ir's IdentityEliminationPass and onnxruntime's optimizer remove the Identity that
   onnxruntime requires there) gets an Identity node again.
4. A step that raises, or whose output fails rule 2, is skipped: the model before it goes on, and the
   record says which step and why, for a notice in the stage's report. Never fatal.
5. The user's model, and a model a helper tool wrote (a quantizer's), are first loaded (and run once) in a
   child process (``native_crash``): onnxruntime can die of a model it should refuse (a float16 LSTM model
   crashes its level-3 optimizer on x86), and a crash here would take every target of the run with it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .accuracy import compare
from .errors import EdgepackError, first_line
from .onnxio.modelinfo import iter_graphs

__all__ = [
    "run_checked",
    "run_ir_passes",
    "job_inputs",
    "work_paths_out",
    "held_back",
    "cpu_session",
    "outputs_of",
    "repair_outer_scope_outputs",
    "notice_of",
    "native_crash",
    "MIN_COSINE",
    "ABS_TOLERANCE",
]

MIN_COSINE = 0.9999
ABS_TOLERANCE = 1e-3

Feeds = Callable[[Path], "list[dict[str, Any]] | None"]
"""Check inputs for the model a step wrote (its own input specs), or None when none can be made."""


def run_checked(step: str, before: Path, make: Callable[[], Path], *, feeds: Feeds) -> tuple[Path, dict[str, Any]]:
    """Run ``make`` (which writes a model and returns its path); return that path, or ``before`` if the step
    broke the model (rule 4), with a record: {"step", "status": applied|repaired|skipped, "reason"?, "checked"}."""
    try:
        with held_back():
            after = make()
            repaired = repair_outer_scope_outputs(after)
    except EdgepackError as exc:
        return before, {"step": step, "status": "skipped", "reason": work_paths_out(exc.message), "checked": "raised"}
    except Exception as exc:  # a library failing in any way is a step to skip, not a crash
        return before, {
            "step": step,
            "status": "skipped",
            "reason": work_paths_out(_why(exc)),
            "checked": "raised",
        }
    # what the step held (an onnx-ir model keeps its source's external data memory-mapped, in reference cycles)
    # is freed before the check loads what it wrote: a model of several GB is not held twice
    gc.collect()
    record: dict[str, Any] = {"step": step, "status": "repaired" if repaired else "applied"}
    if repaired:
        record["repairs"] = [f"Identity added for subgraph output {name!r} (an outer-scope value)" for name in repaired]
    reason, checked = _disagreement(before, after, feeds)
    record["checked"] = checked
    if reason:
        return before, {**record, "status": "skipped", "reason": reason}
    return after, record


_WORK_PATH = re.compile(re.escape(tempfile.gettempdir()) + r"/edgepack-[^\s'\":,;()]*")


def work_paths_out(text: str, instead: str = "<work file>") -> str:
    """A library's message without edgepack's scratch paths, which change every run: manifests are reproducible.
    ``instead``: what to name them (the user's model, in an error about a working copy of it)."""
    return _WORK_PATH.sub(lambda _: instead, text)


def _why(exc: BaseException) -> str:
    """The first line of what a library raised; for onnx-ir's SerdeError, which wraps each level of the model it
    was reading ("Error calling _deserialize_graph with: <graph name>"), the innermost cause, which says why."""
    if type(exc).__name__ == "SerdeError":
        while exc.__cause__ is not None:
            exc = exc.__cause__
        return f"onnx-ir cannot read the model: {first_line(exc).split(' Please contribute')[0]}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def run_ir_passes(passes: list, model: Path, folder: Path, *, feeds: Feeds) -> tuple[Path, list[dict[str, Any]]]:
    """Each onnx-ir pass as a checked step, each on what the last kept step wrote (``folder/<n>-<pass>/``):
    the model that results, and a record per pass."""
    import onnx_ir as ir

    from .onnxio.save import save_model

    current, records = model, []
    for index, pass_ in enumerate(passes):
        out = folder / f"{index}-{type(pass_).__name__}" / model.name

        def apply(before: Path = current, pass_=pass_, out: Path = out) -> Path:
            loaded = ir.load(before)
            pass_(loaded)
            out.parent.mkdir(parents=True)
            return save_model(loaded, out)

        current, record = run_checked(type(pass_).__name__, current, apply, feeds=feeds)
        records.append(record)
    return current, records


def job_inputs(job) -> Feeds:
    """Check inputs for a packaging job's steps: fitted to the job's FP32 reference (edgepack.inputs)."""
    from .inputs import plan_for
    from .onnxio.modelinfo import describe_io

    def feeds(model: Path) -> list[dict[str, Any]] | None:
        specs = describe_io(onnx.load_model(model, load_external_data=False))[0]
        if job.options.sample_inputs:  # real inputs win over made-up ones
            from .calibration import load_samples

            return load_samples(job.options.sample_inputs, specs, what="sample input", one_set=True).feeds[:1]
        return plan_for(job, specs).generate(seed=5, count=1)

    return feeds


def notice_of(records: list[dict[str, Any]]) -> str | None:
    """One notice for the steps that were skipped or repaired, or None."""
    by_reason: dict[str, list[str]] = {}
    for r in records:
        if r["status"] == "skipped":
            by_reason.setdefault(r["reason"], []).append(r["step"])
    parts = [
        f"{', '.join(steps)} skipped ({reason}): the model before {'them' if len(steps) > 1 else 'it'} was kept"
        for reason, steps in by_reason.items()
    ]
    parts += [f"{r['step']}: {'; '.join(r['repairs'])}" for r in records if r["status"] == "repaired"]
    return "; ".join(parts) or None


@contextlib.contextmanager
def held_back():
    """Rule 1: library prints, logs and onnxruntime log lines go nowhere while a step runs."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)
        ort.set_default_logger_severity(3)


def repair_outer_scope_outputs(path: Path) -> list[str]:
    """Rule 3, in place: the names of the subgraph outputs that got an Identity (empty if none needed one)."""
    proto = onnx.load_model(path, load_external_data=False)
    used = {
        name
        for graph in iter_graphs(proto.graph)
        for name in [
            *(i.name for i in graph.input),
            *(t.name for t in graph.initializer),
            *(o for n in graph.node for o in n.output),
        ]
    }
    repaired = []
    for graph in list(iter_graphs(proto.graph))[1:]:
        local = (
            {i.name for i in graph.input}
            | {t.name for t in graph.initializer}
            | {o for n in graph.node for o in n.output}
        )
        for output in graph.output:
            if output.name in local:
                continue
            fresh, index = f"{output.name}_returned", 0
            while fresh in used:
                index += 1
                fresh = f"{output.name}_returned_{index}"
            used.add(fresh)
            graph.node.append(onnx.helper.make_node("Identity", [output.name], [fresh]))
            repaired.append(output.name)
            output.name = fresh
    if repaired:
        onnx.save_model(proto, path)  # external data references are kept as they are: the side file is untouched
    return repaired


def _disagreement(before: Path, after: Path, feeds: Feeds) -> tuple[str | None, str]:
    """(why ``after`` is not a faithful copy of ``before``, or None; what was checked). One session at a time:
    a model of several GB is never held twice in memory."""
    try:
        sets = feeds(after)
    except EdgepackError:
        sets = None
    expected = None
    if sets:
        expected = _OUTPUTS.get(_key(before, sets))
        if expected is None:
            try:
                with held_back():
                    expected = outputs_of(quiet_session(before), sets)
            except Exception:  # the model before does not run on them either: only loading can be checked
                expected = None
    try:
        with held_back():
            session = quiet_session(after)
    except (
        Exception
    ) as exc:  # onnxruntime refuses the model: the step broke it, unless the model before was refused too
        if expected is None:
            try:
                with held_back():
                    quiet_session(before)
            except Exception:
                return None, "none: the model before it does not load either"
        return work_paths_out(f"onnxruntime cannot load what it wrote: {first_line(exc)[:300]}"), "load"
    if expected is None or not sets:
        return None, "load"
    try:
        with held_back():
            got = outputs_of(session, sets)
    except Exception as exc:
        return work_paths_out(f"what it wrote fails to run: {first_line(exc)[:300]}"), "outputs"
    finally:
        del session
    _OUTPUTS[_key(after, sets)] = got  # the next step's "before": one session per step, not two
    if list(expected[0]) != list(got[0]):
        return f"its outputs {list(got[0])} differ from the model's {list(expected[0])}", "outputs"
    figures = compare(expected, got)
    scale = max((float(np.max(np.abs(v))) for r in expected for v in _numeric(r).values() if v.size), default=0.0)
    if figures["cosine"] < MIN_COSINE or figures["max_abs_error"] > ABS_TOLERANCE * (1 + scale):
        return (
            f"its outputs differ from the model's (cosine {figures['cosine']:.6f}, "
            f"max abs error {figures['max_abs_error']:.3g})"
        ), "outputs"
    return None, "outputs"


_OUTPUTS: dict[str, list[dict[str, Any]]] = {}
"""Outputs of checked models on check inputs, by model file and input shapes (work files are written once)."""


def _key(path: Path, sets: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for feeds in sets:
        for name, value in sorted(feeds.items()):
            digest.update(name.encode())
            for array in value if isinstance(value, list) else [value]:
                digest.update(np.ascontiguousarray(array).tobytes())
    return f"{path}:{digest.hexdigest()}"


def quiet_session(path: Path):
    """A CPU session of ``path`` that logs nothing (a refusal becomes the caller's one error or record, not also
    an onnxruntime log line), on the exact INT8 kernels every bundle asks for (backends.EXACT_INT8) where the
    model loads with them; where it does not, on the default kernels, as the bundle's shim does then."""
    from .backends import EXACT_INT8

    try:
        return cpu_session(path, EXACT_INT8)
    except Exception:  # onnxruntime raises many kinds from native code; a model it refuses fails again below
        return cpu_session(path)


def cpu_session(model: Path | bytes, entries: dict[str, str] | None = None, *, basic: bool = False):
    """A CPU session of ``model`` (a path, or a serialized model) that logs nothing, with these session config
    entries; ``basic``: graph optimizations basic only (QDQ pairs stay float, no fused int8 kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def outputs_of(session, sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every output of ``session``, by name, for each input set."""
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feeds))) for feeds in sets]


def _numeric(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    from .accuracy import as_numbers

    return {name: as_numbers(value) for name, value in outputs.items()}


_PROBE = """
import json, pickle, sys
import onnxruntime as ort
for line in sys.stdin:
    model, feeds = json.loads(line)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        if feeds != "-":
            with open(feeds, "rb") as f:
                session.run(None, pickle.load(f))
        del session
    except Exception:
        pass  # refusals are the caller's to report, in its own process
    print("survived", flush=True)
"""


class _Probe:
    """One child process that loads and runs models for ``native_crash``: onnxruntime imported once per run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None

    def survives(self, model: Path, feeds: Path | str) -> int | None:
        """None if onnxruntime loaded and ran ``model`` without dying, else the child's exit code."""
        with self.lock:
            if self.child is None or self.child.poll() is not None:
                self.child = subprocess.Popen(
                    [sys.executable, "-c", _PROBE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            assert self.child.stdin is not None and self.child.stdout is not None
            try:
                self.child.stdin.write(json.dumps([str(model), str(feeds)]) + "\n")
                self.child.stdin.flush()
                if self.child.stdout.readline().strip() == "survived":
                    return None
            except BrokenPipeError:
                pass
            code = self.child.wait()
            self.child = None
            return code


_probe = _Probe()


def native_crash(model: Path, feeds: dict[str, Any] | None = None) -> str | None:
    """Rule 5: how onnxruntime died loading ``model`` (and running it on ``feeds``, if given) in a child
    process ("crashed (SIGSEGV)"), or None when it did not (a refusal is not a crash: the caller meets it)."""
    if feeds is None:
        code = _probe.survives(model, "-")
    else:
        held = Path(tempfile.mkstemp(prefix="edgepack-probe-", suffix=".pkl")[1])
        try:
            held.write_bytes(pickle.dumps(feeds))
            code = _probe.survives(model, held)
        finally:
            held.unlink(missing_ok=True)
    if code is None:
        return None
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"crashed ({signal.Signals(-code).name})"
    return f"died (exit code {code})"
