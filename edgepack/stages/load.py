"""Stage 1, load: read the user's model once, refuse what is broken or unsafe, write a clean FP32 copy.

Rules:
1. The model must be a non-empty file that parses as ONNX. What ``onnx.checker`` finds becomes a notice
   when onnxruntime loads the model anyway (old IR-3 models whose initializers are not graph inputs,
   outputs without a shape); a refusal only when onnxruntime refuses it too. A model the checker passes
   and onnxruntime refuses (two nodes of one name) is refused with onnxruntime's words; one onnxruntime
   dies of (tried in a child process first, edgepack.checked rule 5) is refused as such.
2. Every external-data ``location`` must be a relative path inside the model's folder (no ``..``, no
   absolute path, no symlink leading out), and its file must hold ``offset + length`` bytes.
3. Every node input exists and the graphs have no cycle (edgepack.onnxio.graphcheck), and every op has a
   kernel in onnxruntime: a model no target can run is refused before anything is written.
4. The model is copied (never modified in place), then re-written through onnx-ir, which memory-maps
   external data: initializers listed as graph inputs (IR 3) are removed from the inputs, weights held
   in Constant nodes become initializers. Each pass is a checked step (edgepack.checked): one that
   fails (onnx-ir cannot read ai.onnx.ml map types) or breaks the model is skipped with a notice.
5. An IR-3 model with initializers is written as IR 4, the first version where an initializer need not be
   an input, whether the pass took them out of its inputs or the model never listed them (as onnxruntime's
   old test models do): onnx's checker and shape inference, and the quantizer after them, refuse the copy
   otherwise. An IR 4+ model's inputs that had an initializer (a default the caller could override, as
   older exporters wrote every weight) are named in a notice: the bundle holds them as constants, fed by
   no one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass

from ..bundle.manifest import hash_file
from ..checked import held_back, native_crash, notice_of, quiet_session, run_ir_passes
from ..errors import ModelError, UsageError, first_line
from ..fileops import copy_model
from ..inputs import fit_inputs
from ..onnxio.graphcheck import check_structure
from ..onnxio.kernels import ops_without_kernel
from ..onnxio.modelinfo import describe_io, external_locations, iter_nodes, opsets, summarize
from ..pipeline.job import Source
from ..pipeline.stage import StageResult, optional

__all__ = ["load", "load_result", "LoadResult", "parse_model"]


@dataclass(frozen=True, kw_only=True)
class LoadResult(StageResult):
    stage = "load"
    summary: str
    source: str
    sha256: str
    nodes: int
    subgraphs: int
    passes: dict[str, str]
    """onnx-ir passes run on the copy (rule 4): applied, repaired or skipped."""
    notice: str | None = optional()


def load_result(source: Source) -> LoadResult:
    """The load stage's result, for every target's manifest (the model is loaded once for all)."""
    info = source.info
    external = info["external_data"]
    extra = (
        f", external data {len(external['files'])} file(s) {external['bytes'] / 1e6:.2f} MB"
        if external["files"]
        else ""
    )
    return LoadResult(
        summary=f"{info['nodes']} nodes, IR {info['ir_version']}, opsets {info['opsets']}{extra}",
        source=source.path.name,
        sha256=info["sha256"],
        nodes=info["nodes"],
        subgraphs=info["subgraphs"],
        passes=info["passes"],
        notice="; ".join(info["notices"]) or None,
    )


def load(path: Path, workdir: Path, name: str | None = None) -> Source:
    proto = _read_and_check(path)
    crash = native_crash(path)
    if crash:
        raise ModelError(
            f"onnxruntime {crash} loading the model (in a separate process: nothing was written)",
            where=str(path),
            hint="plain onnxruntime with its default session options dies of it too: re-export the model "
            "(a float16 model: export it in float32 and let edgepack convert it per target)",
        )
    info = summarize(proto, path)
    overridable = _inputs_with_defaults(proto)
    del proto  # a model with inline weights is held once at a time: by the checker, then by onnx-ir
    notices = []
    finding = _run_onnx_checker(path)
    if finding:
        notices.append(f"onnx.checker: {finding} (onnxruntime loads the model, so it is packaged)")
    reference, records = _write_reference(path, workdir, info["external_data"]["files"])
    # a pass's check found the model itself unloadable, or no pass could read it (onnx-ir and map types), so
    # no check loaded it: what onnxruntime says is a refusal before any target (rule 1)
    if all(r["status"] == "skipped" for r in records) or any(
        r.get("checked", "").startswith("none: the model before it does not load") for r in records
    ):
        _refuse_unloadable(path)
    skipped = notice_of(records)
    if skipped:
        notices.append(skipped)
    moved = next((r for r in records if r["step"] == InitializersOutOfInputsPass.__name__), None)
    if overridable and info["ir_version"] >= 4 and moved and moved["status"] != "skipped":
        shown = ", ".join(repr(n) for n in overridable[:3]) + (", ..." if len(overridable) > 3 else "")
        notices.append(
            f"{len(overridable)} graph input(s) with an initializer default ({shown}) are packaged as constants "
            "(rule 5): the bundle takes only the other inputs"
        )
    info.update(
        {"sha256": hash_file(path)["sha256"], "passes": {r["step"]: r["status"] for r in records}, "notices": notices}
    )
    return Source(name=name or path.stem, path=path, reference=reference, info=info)


def parse_model(path: Path) -> onnx.ModelProto:
    """The model's protobuf (external data not read), checked: rules 1 to 3."""
    proto = _read_and_check(path)
    _run_onnx_checker(path)
    return proto


def _write_reference(path: Path, workdir: Path, side_files: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """Rule 4: the FP32 reference in ``workdir``, and a record per onnx-ir pass."""
    copied = copy_model(path, workdir / "source" / "reference.onnx", side_files)
    return run_ir_passes(
        [InitializersOutOfInputsPass(), LiftConstantsToInitializersPass()],
        copied,
        workdir,
        feeds=lambda after: _check_inputs(path, after),
    )


class InitializersOutOfInputsPass(RemoveInitializersFromInputsPass):
    """onnx-ir's pass, and IR 4 for an IR-3 model with initializers (rule 5)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if model.ir_version < 4 and model.graph.initializers:
            model.ir_version = 4
            return ir.passes.PassResult(model, modified=True)
        return result


def _inputs_with_defaults(proto: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name in initializers]


def _check_inputs(source: Path, model: Path) -> list[dict[str, Any]] | None:
    try:
        specs = describe_io(onnx.load_model(model, load_external_data=False))[0]
        return fit_inputs(source, specs).generate(seed=5, count=1)
    except UsageError:
        return None  # no inputs fit: the step is checked by loading only


def _read_and_check(path: Path) -> onnx.ModelProto:
    try:
        if path.is_dir():
            raise ModelError(
                "is a folder, not an ONNX model file", where=str(path), hint="pass the .onnx file inside it"
            )
        if not path.is_file():
            raise ModelError("no such file", where=str(path))
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the file: {exc}", where=str(path)) from None
    if size == 0:
        raise ModelError("the file is empty (0 bytes)", where=str(path))
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, TypeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"not a valid ONNX model: the protobuf cannot be parsed ({type(exc).__name__})",
            where=str(path),
            hint="the file may be truncated or not an ONNX model; re-export or re-download it",
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(
            "not an ONNX model: it has no graph",
            where=str(path),
            hint="the file may be truncated or not an ONNX model; re-export or re-download it",
        )
    _check_external_data(proto, path)
    check_structure(proto, str(path))
    _check_kernels(proto, path)
    return proto


def _run_onnx_checker(path: Path) -> str | None:
    """Rule 1: what onnx.checker finds, when onnxruntime loads the model anyway; a ModelError when it does not."""
    try:
        onnx.checker.check_model(
            str(path)
        )  # from the path: external data is looked up beside the model, not in the cwd
        return None
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        finding = first_line(exc)
    refused = _onnxruntime_refusal(path)
    if refused:
        raise ModelError(
            f"the ONNX checker rejects the model: {finding}",
            where=str(path),
            hint=f"onnxruntime refuses it too: {refused[:300]}",
        )
    return finding


def _onnxruntime_refusal(path: Path) -> str | None:
    """What onnxruntime says when it cannot load the model, or None when it loads it."""
    try:
        with held_back():
            quiet_session(path)
    except Exception as exc:  # onnxruntime raises many kinds from native code
        return first_line(exc)
    return None


_VERSION_REFUSALS = ("ValidateOpsetForDomain", "IR version")


def _refuse_unloadable(path: Path) -> None:
    """Rule 1: onnx.checker passed a model onnxruntime refuses (two nodes of one name, a type onnx does not
    check): a refusal naming what onnxruntime said, before any target works on it."""
    said = _onnxruntime_refusal(path)
    # an opset or IR version newer than onnxruntime's is left to each target's check, which names the fix
    if said and not any(sign in said for sign in _VERSION_REFUSALS):
        raise ModelError(
            f"onnxruntime cannot load the model: {said[:400]}",
            where=str(path),
            hint="onnx.checker accepts it, onnxruntime does not: fix what it names and re-export the model",
        )


def _check_kernels(proto: onnx.ModelProto, path: Path) -> None:
    """onnxruntime here is at least as new as any target's runtime: an op it cannot run, no target can."""
    imported = opsets(proto)
    local = {(f.domain, f.name) for f in proto.functions}
    undeclared = sorted(
        {
            ("ai.onnx" if n.domain in ("", "ai.onnx") else n.domain)
            for n in iter_nodes(proto)
            if (n.domain, n.op_type) not in local
        }
        - set(imported)
    )
    if undeclared:
        raise ModelError(
            f"the model's nodes use domain(s) {', '.join(undeclared)} but it imports no opset for them",
            where=str(path),
            hint="the file may be truncated or hand-edited; re-export it",
        )
    missing = ops_without_kernel(proto, imported)
    if missing:
        listed = ", ".join(f"{op} (x{count})" for op, count in sorted(missing.items()))
        raise ModelError(
            f"no runtime of any target can run these ops (unknown op or domain): {listed}",
            where=str(path),
            hint="these ops come from a custom domain, a typo or a newer ONNX; replace them before packaging",
        )


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    sizes: dict[str, int] = {}
    try:
        locations = external_locations(proto)
    except ModelError as exc:
        exc.where = str(path)
        raise
    for tensor, location, offset, length in locations:
        where = f"{path} (tensor {tensor!r})"
        if not location:
            raise ModelError("external data with no location", where=where)
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in Path(location).parts:
            raise ModelError(
                f"external data location {location!r} points outside the model's folder",
                where=where,
                hint="side files must sit in the model's folder or below it",
            )
        side = path.parent / location
        try:
            inside = side.resolve().is_relative_to(folder)
            present = side.is_file()
            size = sizes.setdefault(location, side.stat().st_size) if present else 0
        except (OSError, ValueError, RuntimeError) as exc:  # a name with a NUL byte, too long, a link loop
            raise ModelError(f"external data file {location!r} cannot be read: {exc}", where=where) from None
        if not inside:
            raise ModelError(
                f"external data file {location!r} is a link leading outside the model's folder",
                where=where,
                hint="copy the side file into the model's folder instead of linking it",
            )
        if not present:
            raise ModelError(
                f"external data file {location!r} is missing",
                where=where,
                hint="copy the side files next to the .onnx file",
            )
        end = offset + (length or 0)
        if end > size or (length is None and offset > size):
            raise ModelError(
                f"external data file {location!r} is {size} bytes, shorter than the tensor's offset+length ({end})",
                where=where,
                hint="the side file is truncated; copy it again",
            )
