"""Data-pipeline throughput on this host: tokenizing, building (tokenize + pack + write) and loading batches.

    python benchmarks/data.py [--seq_len=8192] [--global_batch_size=32] [--load_steps=10] [--num_workers=CPUS]
        [--out=benchmarks/results/data_cpu]

The text is the embedded default corpus (lsm_jax.data.corpora, ~2 MB of Python documentation). Writes
OUT.json and OUT.md with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from lsm_jax.data import build as build_lib
from lsm_jax.data import corpora
from lsm_jax.data import loader as loader_lib
from lsm_jax.data import tokenizer as tokenizer_lib


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown"


def _best_of(repeats: int, work) -> tuple[float, object]:
  """Fastest of `repeats` runs: the host is shared, so the minimum is the least disturbed measurement."""
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = work()
    timings.append(time.perf_counter() - start)
  return min(timings), result


def measure_tokenize(documents: list[str], tokenizer: tokenizer_lib.Tokenizer) -> dict:
  seconds, tokens = _best_of(3, lambda: sum(len(tokenizer.encode_document(text)) for text in documents))
  characters = sum(map(len, documents))
  return {
    "tokenizer": tokenizer.name,
    "backend": getattr(tokenizer, "backend", tokenizer.name),
    "tokens": tokens,
    "seconds": seconds,
    "tokens_per_sec": tokens / seconds,
    "chars_per_sec": characters / seconds,
  }


def measure_build(documents: list[str], work_dir: str, *, seq_len: int, tokenizer: str, num_workers: int) -> dict:
  start = time.perf_counter()
  report = build_lib.build_from_documents(
    documents,
    work_dir,
    seq_len=seq_len,
    tokenizer=tokenizer,
    val_fraction=0.1,
    input_fingerprint=["benchmark", tokenizer],
    num_workers=num_workers,
    show_progress=False,
  )
  seconds = time.perf_counter() - start
  tokens = sum(split["tokens"] for split in report["splits"].values())
  return {
    "tokenizer": tokenizer,
    "num_workers": num_workers,
    "seq_len": seq_len,
    "tokens": tokens,
    "records": sum(split["records"] for split in report["splits"].values()),
    "seconds": seconds,
    "tokens_per_sec": tokens / seconds,
  }


def measure_load(data_dir: str, *, seq_len: int, global_batch_size: int, steps: int) -> dict:
  loader = loader_lib.make_loader(data_dir, seq_len=seq_len, global_batch_size=global_batch_size, seed=0)
  loader.global_batch(0)  # opens the ArrayRecord readers
  seconds, _ = _best_of(3, lambda: [loader.global_batch(step) for step in range(1, steps + 1)])
  tokens = steps * global_batch_size * seq_len
  return {
    "seq_len": seq_len,
    "global_batch_size": global_batch_size,
    "steps": steps,
    "num_records": loader.num_records,
    "seconds": seconds,
    "tokens_per_sec": tokens / seconds,
    "batches_per_sec": steps / seconds,
  }


def measure_index_sampling(num_records: int, indices: int = 2000) -> dict:
  """Grain's epoch-aware shuffle, one global index → record index; the loader pays this per row."""
  import grain

  record_index = grain.MapDataset.range(num_records).shuffle(seed=0)
  seconds, _ = _best_of(3, lambda: [record_index[i] for i in range(indices)])
  return {"num_records": num_records, "microseconds_per_index": seconds / indices * 1e6}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq_len", type=int, default=8192)
  parser.add_argument("--global_batch_size", type=int, default=32)
  parser.add_argument("--load_steps", type=int, default=10)
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_cpu"))
  args = parser.parse_args()

  documents = corpora.embedded_documents()
  results = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": {
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "load_average_1min_at_start": os.getloadavg()[0],
    },
    "command": "python " + " ".join(sys.argv),
    "corpus": {"documents": len(documents), "characters": sum(map(len, documents))},
    "tokenize": [measure_tokenize(documents, tokenizer_lib.get_tokenizer(name)) for name in ("cl100k", "bytes")],
    "build": [],
    "load": [],
  }
  with tempfile.TemporaryDirectory() as work_dir:
    for tokenizer in ("cl100k", "bytes"):
      data_dir = os.path.join(work_dir, tokenizer)
      results["build"].append(
        measure_build(documents, data_dir, seq_len=args.seq_len, tokenizer=tokenizer, num_workers=args.num_workers)
      )
      results["load"].append(
        {
          "tokenizer": tokenizer,
          **measure_load(
            data_dir, seq_len=args.seq_len, global_batch_size=args.global_batch_size, steps=args.load_steps
          ),
        }
      )

  results["index_sampling"] = [
    measure_index_sampling(n) for n in sorted({row["num_records"] for row in results["load"]} | {1_000_000})
  ]

  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(results, f, indent=2)
  lines = [
    f"# Data pipeline throughput ({results['date']})",
    "",
    f"Machine: {results['machine']['cpu']}, {results['machine']['cpu_count']} cores, "
    f"Python {results['machine']['python']}, 1-minute load average "
    f"{results['machine']['load_average_1min_at_start']:.1f} at start (a shared host). "
    f"Command: `{results['command']}`.",
    f"Corpus: embedded default, {results['corpus']['documents']} documents, "
    f"{results['corpus']['characters']:,} characters.",
    "",
    "| stage | tokenizer | setting | tokens | seconds | tokens/s |",
    "|---|---|---|---:|---:|---:|",
  ]
  for row in results["tokenize"]:
    lines.append(
      f"| tokenize (1 process) | {row['tokenizer']} ({row['backend']}) | | {row['tokens']:,} | "
      f"{row['seconds']:.2f} | {row['tokens_per_sec']:,.0f} |"
    )
  for row in results["build"]:
    lines.append(
      f"| build: tokenize+pack+write | {row['tokenizer']} | {row['num_workers']} workers, seq_len "
      f"{row['seq_len']} | {row['tokens']:,} | {row['seconds']:.2f} | {row['tokens_per_sec']:,.0f} |"
    )
  for row in results["load"]:
    lines.append(
      f"| load global batches | {row['tokenizer']} | {row['global_batch_size']} × {row['seq_len']}, "
      f"{row['steps']} steps | {row['steps'] * row['global_batch_size'] * row['seq_len']:,} | "
      f"{row['seconds']:.2f} | {row['tokens_per_sec']:,.0f} |"
    )
  lines += [
    "",
    "Grain index sampling (µs per row): "
    + ", ".join(
      f"{row['microseconds_per_index']:,.0f} at {row['num_records']:,} records" for row in results["index_sampling"]
    )
    + ". It is slow for tiny splits, so loading the small embedded corpus is bound by it.",
  ]
  lines += [
    "",
    "Tokenize and load rows are the best of 3 runs. Build rows are one end-to-end run on this small "
    "corpus, dominated by fixed costs (starting the worker processes, importing the tokenizer, TFDS "
    "setup), so they understate the rate on a large corpus, which approaches the per-process "
    "tokenize rate times the number of workers.",
  ]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
