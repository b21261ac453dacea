"""python -m jalign.convert {hf-to-jalign,jalign-to-hf,nemo-to-jalign} SRC DST"""
import argparse
import sys

from jalign.convert import ConversionError, hf_to_jalign, jalign_to_hf, nemo_to_jalign


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jalign.convert", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("hf-to-jalign", help="an HF model directory -> a jalign model directory")
  a.add_argument("src")
  a.add_argument("dst")
  b = sub.add_parser("jalign-to-hf", help="a jalign model directory (or finished run) -> an HF directory")
  b.add_argument("src")
  b.add_argument("dst")
  b.add_argument("--family", choices=["llama", "mistral", "qwen2", "gemma"], default=None,
                 help="HF architecture to write (default: the one converted from, else llama)")
  b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
  b.add_argument("--drop-bias", action="store_true",
                 help="export a value head with a non-zero bias, which HF's score layer lacks; config.json "
                 "records it (jalign_value_head_bias) and jalign restores it on reading")
  c = sub.add_parser("nemo-to-jalign", help="a .nemo file (or its extracted directory) -> a jalign model directory")
  c.add_argument("src")
  c.add_argument("dst")
  args = p.parse_args(argv)
  from jalign.checkpoint import CheckpointError
  try:
    if args.cmd == "hf-to-jalign":
      out = hf_to_jalign(args.src, args.dst)
    elif args.cmd == "nemo-to-jalign":
      out = nemo_to_jalign(args.src, args.dst)
    else:
      out = jalign_to_hf(args.src, args.dst, args.family, args.dtype, args.drop_bias)
  except (ConversionError, CheckpointError, FileNotFoundError) as e:
    print(f"jalign.convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
