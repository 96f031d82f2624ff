"""Work the targets of one model share, done once: a step's result kept by the content of its input.

Rules:
1. A shared step is a function of its input model (file and external data), the loaded model and the
   model's options, never of the target. Its key is the step's name, the SHA-256 of the input's files and
   the options that check inputs depend on; two targets whose input is the same bytes (every
   dynamic-shape target after fix_shapes, or two targets fixed to the same shapes) get one run.
2. The results live beside the loaded model (so two loaded models never share them), which every pair
   of the model reads on this machine: the pairs of one run share them in this process and in worker
   processes alike. A Ray task has its own copy of the loaded model, hence its own results.
3. One process runs the step while the others wait on an exclusive ``flock`` of the entry; an entry is
   complete once its ``record.json`` exists (written last, by rename). A step that raises leaves no
   entry: each pair then runs it and reports its own error.
4. A result that is the input itself (every pass skipped) names no file: each pair keeps its own input.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["shared_step"]

_RECORD = "record.json"
_SAME = None  # rule 4: the output is the input


def shared_step(job, step: str, model: Path, run: Callable[[Path], tuple[Path, Any]]) -> tuple[Path, Any]:
    """``run(folder)`` writes its output model inside ``folder`` and returns (its path, a JSON record), or
    returns ``model`` itself; done once per key (rule 1) for all the pairs of ``job``'s model."""
    key = _key(job, step, model)
    root = job.source.reference.parent / "shared" / step
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    with open(root / f"{key}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (entry / _RECORD).is_file():
                saved = json.loads((entry / _RECORD).read_text(encoding="utf-8"))
                output = model if saved["output"] is _SAME else entry / saved["output"]
                return output, saved["record"]
            shutil.rmtree(entry, ignore_errors=True)  # what a step that raised left (rule 3)
            entry.mkdir()
            output, record = run(entry)
            relative = _SAME if output == model else output.relative_to(entry).as_posix()
            temp = Path(tempfile.mkstemp(prefix="record.", dir=entry)[1])
            temp.write_text(json.dumps({"output": relative, "record": record}), encoding="utf-8")
            os.replace(temp, entry / _RECORD)
            return output, record
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(job, step: str, model: Path) -> str:
    from ..cache import model_digests

    options = job.options
    inputs = [options.sample_inputs, options.input_shapes, options.self_test_shapes, options.fixed_dims]
    text = json.dumps([step, model_digests(model), inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
