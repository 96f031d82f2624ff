"""Canonical bytes for an ORT-format model, so that the same conversion always gives the same file.

onnxruntime writes the session's kernel-type-string table (``KernelTypeStrResolver``) by walking a hash
map whose order depends on the state of the process (addresses, what ran before), so two conversions of
the same model can lay those tables out differently: the vectors are sorted, but the tables they point
to sit at different offsets. (Measured on onnxruntime 1.31.1: nothing else in the file varied.)

onnxruntime builds the file back to front: the version string and the whole model first (they end up at
the end of the file, and refer only to each other), then the kernel-type-string table, then the root
table. So the model part is kept byte for byte, and the front is written again with the flatbuffers
builder: the kernel-type-string table in sorted order (ops, then type strings; argument lists in their
stored order) and a new root table. The model's bytes keep their distance from the end of the file,
and the file length is a multiple of 64, so every alignment inside the model is unchanged.

The result is checked before it is returned: same version, same model bytes, same table contents.
A file whose layout does not match these expectations raises ``ValueError`` instead of being changed.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from pathlib import Path

import flatbuffers

__all__ = ["canonical_ort_bytes", "canonicalize_ort_file"]

_FILE_ID = b"ORTM"
ALIGNMENT = 64
_ROOT_FIELDS = {0: "ort_version", 1: "model", 3: "kernel_type_str_resolver"}  # slot 2: deprecated session state


def canonicalize_ort_file(path: Path) -> None:
    """Rewrite ``path`` in canonical form (atomically, and only if its bytes change)."""
    data = path.read_bytes()
    try:
        canonical = canonical_ort_bytes(data)
    except (struct.error, IndexError) as exc:  # offsets that point outside the file
        raise ValueError(f"damaged ORT-format file: {exc}") from None
    if canonical != data:
        temporary = path.with_name(path.name + ".canonical")
        temporary.write_bytes(canonical)
        os.replace(temporary, path)


def canonical_ort_bytes(data: bytes, *, _write_order=sorted, _alignment=ALIGNMENT) -> bytes:
    """``data`` with its kernel type string table rewritten in canonical layout. (``_write_order`` orders
    the writing of the tables, as onnxruntime's hash map does, and ``_alignment`` pads the front as another
    writer might: tests use them to make other layouts.)"""
    fbs = _fbs()
    if len(data) < 8 or data[4:8] != _FILE_ID:
        raise ValueError("not an ORT-format model (no ORTM identifier)")
    session = fbs.InferenceSession.InferenceSession.GetRootAs(data, 0)
    _only_known_fields(session._tab, _ROOT_FIELDS, "InferenceSession")
    model, resolver = session.Model(), session.KernelTypeStrResolver()
    if model is None or resolver is None or session.OrtVersion() is None:
        raise ValueError("ORT-format model without version, model or kernel type string table")

    version_at = _field_target(session._tab, 0)
    model_at = model._tab.Pos
    model_start = min(model_at, model_at - _soffset(data, model_at), version_at)  # the model's vtable precedes it
    entries = _read_resolver(resolver)
    if _highest_table(resolver) >= model_start or session._tab.Pos >= model_start:
        raise ValueError("unexpected ORT-format layout: the kernel type string table is not in front of the model")

    tail = memoryview(data)[model_start:]
    if len(tail) + 4096 > flatbuffers.Builder.MAX_BUFFER_SIZE:
        raise ValueError("ORT-format model too close to the 2 GB flatbuffer limit to be rewritten")
    builder = flatbuffers.Builder(len(tail) + 4096)
    builder.head = len(builder.Bytes) - len(tail)
    builder.Bytes[builder.head :] = tail
    # The model part keeps its distance from the end of the file, and flatbuffers aligns relative to the end:
    # a length that is a multiple of 64 keeps every alignment up to 64 inside it. A fixed value, not one read
    # from the input's length, which differs between the layouts being made canonical.
    builder.minalign = _alignment
    resolver_offset = _write_resolver(builder, fbs, entries, _write_order)
    root = fbs.InferenceSession
    root.InferenceSessionStart(builder)
    root.InferenceSessionAddOrtVersion(builder, len(data) - version_at)
    root.InferenceSessionAddModel(builder, len(data) - model_at)
    root.InferenceSessionAddKernelTypeStrResolver(builder, resolver_offset)
    builder.Finish(root.InferenceSessionEnd(builder), file_identifier=_FILE_ID)
    canonical = bytes(memoryview(builder.Bytes)[builder.Head() :])
    del builder

    _check_same(fbs, data, canonical, entries, len(tail))
    return canonical


def _fbs():
    """onnxruntime's generated flatbuffers classes, without importing ``onnxruntime.tools`` (whose
    package import pulls in torch when it is installed)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("onnxruntime is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tools" / "ort_format_model"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    from ort_flatbuffers_py import fbs  # noqa: PLC0415
    from ort_flatbuffers_py.fbs import (  # noqa: F401, PLC0415  (submodules used as attributes of fbs)
        ArgTypeAndIndex,
        InferenceSession,
        KernelTypeStrArgsEntry,
        KernelTypeStrResolver,
        OpIdKernelTypeStrArgsEntry,
    )

    return fbs


# -- reading


def _read_resolver(resolver) -> list[tuple[bytes, list[tuple[bytes, list[tuple[int, int]]]]]]:
    """The kernel-type-string table as plain data: [(op_id, [(type_str, [(arg_type, index)])])]."""
    _only_known_fields(resolver._tab, {0: "op_kernel_type_str_args"}, "KernelTypeStrResolver")
    ops = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        op = resolver.OpKernelTypeStrArgs(i)
        _only_known_fields(op._tab, {0: "op_id", 1: "kernel_type_str_args"}, "OpIdKernelTypeStrArgsEntry")
        type_strs = []
        for j in range(op.KernelTypeStrArgsLength()):
            entry = op.KernelTypeStrArgs(j)
            _only_known_fields(entry._tab, {0: "kernel_type_str", 1: "args"}, "KernelTypeStrArgsEntry")
            args = []
            for k in range(entry.ArgsLength()):
                arg = entry.Args(k)
                _only_known_fields(arg._tab, {0: "arg_type", 1: "index"}, "ArgTypeAndIndex")
                args.append((arg.ArgType(), arg.Index()))
            type_strs.append((bytes(entry.KernelTypeStr()), args))
        ops.append((bytes(op.OpId()), type_strs))
    return ops


def _highest_table(resolver) -> int:
    """The position of the last table of the kernel-type-string table: all of them were written after
    the model, so they must lie in front of it (strings may be shared with the model, so not them)."""
    highest = resolver._tab.Pos
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        op = resolver.OpKernelTypeStrArgs(i)
        highest = max(highest, op._tab.Pos)
        for j in range(op.KernelTypeStrArgsLength()):
            entry = op.KernelTypeStrArgs(j)
            highest = max([highest, entry._tab.Pos] + [entry.Args(k)._tab.Pos for k in range(entry.ArgsLength())])
    return highest


def _only_known_fields(tab, known: dict[int, str], what: str) -> None:
    vtable = tab.Pos - _soffset(tab.Bytes, tab.Pos)
    vtable_size = flatbuffers.encode.Get(flatbuffers.packer.voffset, tab.Bytes, vtable)
    for slot in range((vtable_size - 4) // 2):
        if slot not in known and tab.Offset(4 + 2 * slot):
            raise ValueError(f"ORT-format {what} has a field (slot {slot}) this edgepack does not know")


def _field_target(tab, slot: int) -> int:
    """Absolute position of the object an offset field points to."""
    field = tab.Offset(4 + 2 * slot)
    return tab.Indirect(tab.Pos + field)


def _soffset(buf, position: int) -> int:
    return flatbuffers.encode.Get(flatbuffers.packer.soffset, buf, position)


# -- writing


def _write_resolver(builder: flatbuffers.Builder, fbs, entries, write_order) -> int:
    """The tables in ``write_order`` (sorted: canonical); the vectors always sorted by key, as onnxruntime does."""
    entry_mod, op_mod, resolver_mod, arg_mod = (
        fbs.KernelTypeStrArgsEntry,
        fbs.OpIdKernelTypeStrArgsEntry,
        fbs.KernelTypeStrResolver,
        fbs.ArgTypeAndIndex,
    )
    strings: dict[bytes, int] = {}

    def string(value: bytes) -> int:
        if value not in strings:
            strings[value] = builder.CreateString(value)
        return strings[value]

    ops = {}
    for op_id, type_strs in write_order(entries):
        type_str_tables = {}
        for type_str, args in write_order(type_strs):
            arg_offsets = []
            for arg_type, index in args:  # argument order is meaningful: kept
                arg_mod.ArgTypeAndIndexStart(builder)
                arg_mod.ArgTypeAndIndexAddArgType(builder, arg_type)
                arg_mod.ArgTypeAndIndexAddIndex(builder, index)
                arg_offsets.append(arg_mod.ArgTypeAndIndexEnd(builder))
            args_vector = _vector(builder, entry_mod.KernelTypeStrArgsEntryStartArgsVector, arg_offsets)
            name = string(type_str)
            entry_mod.KernelTypeStrArgsEntryStart(builder)
            entry_mod.KernelTypeStrArgsEntryAddKernelTypeStr(builder, name)
            entry_mod.KernelTypeStrArgsEntryAddArgs(builder, args_vector)
            type_str_tables[type_str] = entry_mod.KernelTypeStrArgsEntryEnd(builder)
        type_strs_vector = _vector(
            builder,
            op_mod.OpIdKernelTypeStrArgsEntryStartKernelTypeStrArgsVector,
            [type_str_tables[key] for key in sorted(type_str_tables)],
        )
        op_name = string(op_id)
        op_mod.OpIdKernelTypeStrArgsEntryStart(builder)
        op_mod.OpIdKernelTypeStrArgsEntryAddOpId(builder, op_name)
        op_mod.OpIdKernelTypeStrArgsEntryAddKernelTypeStrArgs(builder, type_strs_vector)
        ops[op_id] = op_mod.OpIdKernelTypeStrArgsEntryEnd(builder)
    ops_vector = _vector(
        builder, resolver_mod.KernelTypeStrResolverStartOpKernelTypeStrArgsVector, [ops[key] for key in sorted(ops)]
    )
    resolver_mod.KernelTypeStrResolverStart(builder)
    resolver_mod.KernelTypeStrResolverAddOpKernelTypeStrArgs(builder, ops_vector)
    return resolver_mod.KernelTypeStrResolverEnd(builder)


def _vector(builder: flatbuffers.Builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _check_same(fbs, original: bytes, canonical: bytes, entries, tail_size: int) -> None:
    if memoryview(canonical)[-tail_size:] != memoryview(original)[-tail_size:]:
        raise ValueError("canonical ORT file: the model bytes moved")
    before = fbs.InferenceSession.InferenceSession.GetRootAs(original, 0)
    after = fbs.InferenceSession.InferenceSession.GetRootAs(canonical, 0)
    if after.OrtVersion() != before.OrtVersion():
        raise ValueError("canonical ORT file: the version string changed")
    if len(canonical) - after.Model()._tab.Pos != len(original) - before.Model()._tab.Pos:
        raise ValueError("canonical ORT file: the model root moved")
    written = _read_resolver(after.KernelTypeStrResolver())
    if written != sorted((op, sorted(type_strs)) for op, type_strs in entries):
        raise ValueError("canonical ORT file: the kernel type string table changed")
