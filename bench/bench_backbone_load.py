"""SmolLM2: first conversion from the GGUF file against a cached load (issue 3).

Each phase runs in a fresh Python process, as a user's second run would, with its
own cache folder (a temporary one unless --cache_dir is given):

  1. `convert`: `load_or_convert_smollm2` on an empty cache folder (read and
     dequantize the GGUF file, un-permute Q/K, build the backbone, write the preset);
  2. `cached`: the same call on the filled cache folder, then `load_preset`
     (backbone and tokenizer ready to use), `--repeats` times.

Prints one JSON line: the conversion time, the median cached time, their ratio (the
issue's target is >= 5x), the phases of the last cached load, the machine load.
Import time of TensorFlow is reported apart and counted in neither.

    python -m bench.bench_backbone_load [--repeats=5] [--cache_dir=DIR]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from absl import app, flags  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Cached loads timed (median reported).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Cache folder to convert into (must not hold SmolLM2 yet); temp if unset."
)

# Runs in the child process; prints one JSON object of phase timings.
_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
start = time.perf_counter()
import tensorflow as tf  # noqa: F401
from fedprompt.backbones import preset_io, smollm2
timings = {"import_s": time.perf_counter() - start}
cache_dir, mode = sys.argv[1], sys.argv[2]
start = time.perf_counter()
path = smollm2.load_or_convert_smollm2(cache_dir=cache_dir)
timings["resolve_s"] = time.perf_counter() - start
if mode == "cached":
    t = time.perf_counter()
    preset_io.validate_preset_dir(path)
    timings["validate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    backbone = preset_io.load_backbone(path)
    timings["backbone_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = preset_io.tokenizers_lib.load_text_tokenizer(path)
    timings["tokenizer_s"] = time.perf_counter() - t
    assert backbone.count_params() == 162_826_560 and tokenizer.vocabulary_size == 49152
    timings["load_s"] = time.perf_counter() - start
print("RESULT " + json.dumps(timings))
"""


def _run_child(cache_dir: str, mode: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, cache_dir, mode],
        capture_output=True,
        text=True,
        check=False,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{mode} child failed (rc {completed.returncode}):\n{completed.stderr}")


def main(argv):
    del argv
    with tempfile.TemporaryDirectory(prefix="fedprompt-bench-load-") as temp:
        cache_dir = _CACHE_DIR.value or temp
        from fedprompt.backbones import smollm2

        if smollm2.cached_preset_dir(cache_dir).exists():
            raise SystemExit(
                f"--cache_dir={cache_dir} already holds SmolLM2; the first conversion cannot be "
                "timed there. Pass an empty folder or leave --cache_dir unset."
            )
        load_before = os.getloadavg()[0]
        convert = _run_child(cache_dir, "convert")
        cached = [_run_child(cache_dir, "cached") for _ in range(_REPEATS.value)]
    cached_s = statistics.median(c["load_s"] for c in cached)
    print(
        json.dumps(
            {
                "bench": "backbone_load",
                "backbone": "smollm2-135m-instruct",
                "convert_s": round(convert["resolve_s"], 2),
                "cached_load_s_median": round(cached_s, 2),
                "cached_load_s_all": [round(c["load_s"], 2) for c in cached],
                "speedup": round(convert["resolve_s"] / cached_s, 2),
                "cached_phases_last": {k: round(v, 2) for k, v in cached[-1].items()},
                "import_tf_s": round(convert["import_s"], 2),
                "repeats": _REPEATS.value,
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
