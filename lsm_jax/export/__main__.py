r"""Export a milestone for Hugging Face transformers, or import a transformers LLaMA checkpoint.

  python -m lsm_jax.export --checkpoint=MODEL_DIR --out=DIR [--step=N] [--dtype=bfloat16|float32]
                           [--format=hf|fla] [--noverify]
  python -m lsm_jax.export import --hf_dir=DIR --run_dir=MODEL_DIR [--dtype=bfloat16|float32] [--tokenizer=SPEC]

Export: `--checkpoint` is a run directory (milestone `--step`, default the last) or one milestone directory
MODEL_DIR/checkpoints/milestones/<step>; DIR then loads with `AutoModelForCausalLM.from_pretrained(DIR)` (LLaMA) or
`from_pretrained(DIR, trust_remote_code=True)` (TNL, HGRN2, cosFormer2, hybrid stacks). `--format=fla` (fla's HGRN2
classes) is refused with the reason: the architectures differ. The export is reloaded with transformers and its
logits compared with lsm_jax's unless `--noverify`.
Import: writes the LLaMA checkpoint as milestone 0 of the new run directory MODEL_DIR, which
`python -m lsm_jax.evaluate --run_dir=MODEL_DIR` evaluates and `trainer.train.init_from=MODEL_DIR` trains on from.

Exit codes (lsm_jax/errors.py): 0 done; 2 a problem to fix first (bad arguments, a milestone whose files fail
their checksums, a checkpoint that cannot be imported), one line `error: ...` and no traceback; 1 an export that
transformers does not load as the same model.
"""

from __future__ import annotations

import argparse
import sys

from lsm_jax import checkpoint, errors
from lsm_jax.export import hf


def _export(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m lsm_jax.export",
    description=__doc__.split("\n\n")[0],
    epilog="Import: python -m lsm_jax.export import --help. Details: docs/export.md.",
  )
  parser.add_argument("--checkpoint", required=True, help="run directory or milestone directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--step", type=int, default=None, help="milestone step (default: the last milestone)")
  parser.add_argument("--dtype", choices=hf.EXPORT_DTYPES, default=None, help="default: as saved")
  parser.add_argument(
    "--format",
    choices=hf.FORMATS,
    default="hf",
    dest="export_format",
    help="hf: transformers directory (default); fla: refused for lsm_jax's HGRN2, with the reason",
  )
  parser.add_argument(
    "--noverify", action="store_false", dest="verify", help="skip reloading the export with transformers"
  )
  args = parser.parse_args(argv)
  result = hf.export_hf(
    args.checkpoint, args.out, step=args.step, dtype=args.dtype, export_format=args.export_format, verify=args.verify
  )
  check = result.get("verification") or {"verified": False, "reason": "not verified (--noverify)"}
  status = (
    f"verified with transformers, max logit difference {check['max_abs_logit_difference']:.2g}"
    if check["verified"]
    else check["reason"]
  )
  print(
    f"exported {result['arch']} step {result['step']} ({len(result['tensor_sources'])} tensors, "
    f"{result['dtype']}) to {args.out}; {status}"
  )


def _import(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m lsm_jax.export import", description="Import a transformers LLaMA checkpoint as an lsm_jax run."
  )
  parser.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors")
  parser.add_argument("--run_dir", required=True, help="new lsm_jax run directory to write")
  parser.add_argument(
    "--dtype",
    choices=hf.EXPORT_DTYPES,
    default=None,
    help="milestone and compute dtype (default: float32 for fp32 weights, else bfloat16)",
  )
  parser.add_argument(
    "--tokenizer", default=None, help="tokenizer spec for the run (default: the checkpoint's tokenizer.json)"
  )
  args = parser.parse_args(argv)
  run_dir = hf.import_llama(args.hf_dir, args.run_dir, dtype=args.dtype, tokenizer=args.tokenizer)
  print(f"imported {args.hf_dir} as milestone 0 of {run_dir}")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv and argv[0] == "import":
      _import(argv[1:])
    else:
      _export(argv)
  except hf.ExportVerificationError as error:
    errors.exit_with(errors.EXIT_FAILED, str(error))
  except checkpoint.CorruptCheckpointError as error:
    errors.exit_with(
      errors.EXIT_USER_ERROR,
      f"{error}. Nothing was exported. Export another milestone with --step "
      f"({checkpoint.intact_alternatives(error)}) or restore the damaged files from a copy",
    )
  except (ValueError, FileNotFoundError) as error:  # bad arguments or an unrepresentable checkpoint
    errors.exit_with(errors.EXIT_USER_ERROR, str(error))


if __name__ == "__main__":
  main()
