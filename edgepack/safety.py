"""What a profile may ask of onnxruntime, and how a profile file is read when it may be hostile.

Rules:
1. Session config entries and provider options are passed to onnxruntime as they are, and some of them
   name files that onnxruntime then writes or reads (``session.collect_node_memory_stats_to_file`` is
   truncated and rewritten on every run; ``ep.context_file_path``, TensorRT's engine and timing cache
   paths, CoreML's ``ModelCacheDirectory``, OpenVINO's ``cache_dir``). So only the entries and options
   listed below, known to touch no file, are accepted, and no value may contain a path separator.
   The one path a profile may give is CoreML's cache, as ``$CACHES/<name>`` (the iOS loader puts it in
   the app's caches folder); the Python shim places TensorRT's caches itself, outside the bundle.
2. ``runtime_shim/edgepack_shim.py`` holds its own copy of these lists (it must stand alone) and checks
   every manifest against them before a session is made; a test keeps both copies equal.
3. ``coverage.op_list`` names one of the operator lists shipped in ``edgepack/data``, nothing else.
4. Profiles are YAML read with aliases refused: an alias expands to a copy of its anchor, so a few
   hundred bytes (a "billion laughs") become gigabytes before any key is checked. Profiles need none.
5. Messages quote a value found in a file through ``shown``, at most ``SHOWN_CHARS`` characters.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ProfileError

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = ["CONFIG_ENTRIES", "PROVIDER_OPTIONS", "MAX_THREADS", "check_profile", "op_list_names", "load_yaml", "shown"]

CONFIG_ENTRIES = frozenset(
    {
        "session.load_model_format",
        "session.enable_saved_runtime_optimizations",
        "session.qdqisint8allowed",
        "session.disable_prepacking",
        "session.disable_quant_qdq",
        "session.disable_double_qdq_remover",
        "session.enable_quant_qdq_cleanup",
        "session.disable_cpu_ep_fallback",
        "session.allow_released_opsets_only",
        "session.set_denormal_as_zero",
        "session.use_deterministic_compute",
        "session.x64quantprecision",
        "session.intra_op.allow_spinning",
        "session.inter_op.allow_spinning",
        "session.disable_aot_function_inlining",
        "optimization.enable_gelu_approximation",
        "optimization.disable_specified_optimizers",
        "optimization.minimal_build_optimizations",
    }
)
"""Session config entries that change how a model runs and name no file."""

PROVIDER_OPTIONS = {
    "CPUExecutionProvider": frozenset(),
    "CUDAExecutionProvider": frozenset(
        {
            "device_id",
            "gpu_mem_limit",
            "arena_extend_strategy",
            "cudnn_conv_algo_search",
            "do_copy_in_default_stream",
            "cudnn_conv_use_max_workspace",
            "cudnn_conv1d_pad_to_nc1d",
            "enable_cuda_graph",
            "prefer_nhwc",
            "use_tf32",
            "tunable_op_enable",
            "tunable_op_tuning_enable",
            "enable_skip_layer_norm_strict_mode",
        }
    ),
    "TensorrtExecutionProvider": frozenset(
        {
            "device_id",
            "trt_fp16_enable",
            "trt_int8_enable",
            "trt_bf16_enable",
            "trt_engine_cache_enable",
            "trt_timing_cache_enable",
            "trt_max_workspace_size",
            "trt_builder_optimization_level",
            "trt_max_partition_iterations",
            "trt_min_subgraph_size",
            "trt_dla_enable",
            "trt_dla_core",
            "trt_force_sequential_engine_build",
            "trt_context_memory_sharing_enable",
            "trt_layer_norm_fp32_fallback",
            "trt_cuda_graph_enable",
            "trt_sparsity_enable",
            "trt_auxiliary_streams",
            "trt_build_heuristics_enable",
            # read by the Python shim, never passed to onnxruntime
            "tensorrt_version",
            "dynamic_dims",
        }
    ),
    "NnapiExecutionProvider": frozenset({"flags"}),
    "CoreMLExecutionProvider": frozenset(
        {
            "ModelFormat",
            "MLComputeUnits",
            "RequireStaticInputShapes",
            "EnableOnSubgraphs",
            "SpecializationStrategy",
            "AllowLowPrecisionAccumulationOnGPU",
            "ModelCacheDirectory",
        }
    ),
    "XnnpackExecutionProvider": frozenset({"intra_op_num_threads"}),
    "wasm": frozenset(),
    "webgpu": frozenset({"preferredLayout"}),
}
"""Provider options per provider that name no file; a provider not listed here takes no options."""

CACHE_OPTION = ("CoreMLExecutionProvider", "ModelCacheDirectory")
CACHE_VALUE = re.compile(r"\$CACHES/[A-Za-z0-9._-]{1,100}")
"""The one path option: a folder in the app's caches, which the iOS loader resolves."""

MAX_THREADS = 1024
"""More threads than any edge device has cores; onnxruntime takes an int32 and fails at load above that."""
MAX_TEXT = 256

SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` characters (a hostile file's value may be gigabytes)."""
    text = repr(value) if not isinstance(value, (dict, list)) or _small(value) else f"a {type(value).__name__}"
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _small(value: Any) -> bool:
    return len(value) <= 8 and all(
        not isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value)
    )


def check_profile(profile: Profile, where: str) -> None:
    """Raise ProfileError naming the key of the first session setting or provider option not known to be safe."""
    threads = profile.session.intra_op_num_threads
    if threads > MAX_THREADS:
        raise ProfileError(
            f"key 'session.intra_op_num_threads': expected at most {MAX_THREADS}, found {shown(threads)}", where=where
        )
    for key, value in profile.session.config_entries.items():
        problem = config_entry_problem(key, value)
        if problem:
            raise ProfileError(
                f"key 'session.config_entries.{shown(key)[1:-1]}': {problem}",
                where=where,
                hint="session entries that name files make onnxruntime write outside the bundle; "
                f"accepted entries: {', '.join(sorted(CONFIG_ENTRIES))}",
            )
    for i, provider in enumerate(profile.execution_providers):
        for key, value in provider.options.items():
            problem = provider_option_problem(provider.name, key, value)
            if problem:
                known = ", ".join(sorted(PROVIDER_OPTIONS.get(provider.name, ()))) or "none"
                raise ProfileError(
                    f"key 'execution_providers[{i}].options.{shown(key)[1:-1]}': {problem}",
                    where=where,
                    hint=f"options accepted for {shown(provider.name)[1:-1]}: {known}",
                )
    if profile.coverage.op_list and profile.coverage.op_list not in op_list_names():
        raise ProfileError(
            f"key 'coverage.op_list': expected one of the operator lists shipped with edgepack, "
            f"found {shown(profile.coverage.op_list)}",
            where=where,
            hint="name one of: " + ", ".join(op_list_names()),
        )


def config_entry_problem(key: str, value: Any) -> str | None:
    if key not in CONFIG_ENTRIES:
        return "not an entry known to be safe (it may name a file onnxruntime writes)"
    return _text_problem(value)


def provider_option_problem(provider: str, key: str, value: Any) -> str | None:
    if key not in PROVIDER_OPTIONS.get(provider, ()):
        return "not an option known to be safe for this provider (it may name a file or folder)"
    if (provider, key) == CACHE_OPTION:
        return (
            None
            if isinstance(value, str) and CACHE_VALUE.fullmatch(value)
            else "expected $CACHES/<folder name> (the app's caches folder), found another path"
        )
    if key == "dynamic_dims":
        return None  # [min, opt, max] lists of numbers, checked by the shim
    for item in value if isinstance(value, list) else [value]:
        problem = _text_problem(item)
        if problem:
            return problem
    return None


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, (str, int, float, bool)):
        return "expected text, a number or true/false"
    text = str(value)
    if len(text) > MAX_TEXT:
        return f"the value is longer than {MAX_TEXT} characters"
    if "/" in text or "\\" in text or "\x00" in text:
        return f"the value {shown(value)} looks like a path, and paths are not accepted here"
    return None


def op_list_names() -> list[str]:
    """The operator lists shipped in edgepack/data."""
    return sorted(p.name for p in (resources.files("edgepack") / "data").iterdir() if p.name.endswith(".txt"))


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in a profile", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with aliases refused (rule 4)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
