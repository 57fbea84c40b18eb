"""python -m pathways_jax.interop.hf import|export|export-adapter: HuggingFace directories (and
PEFT LoRA adapters) <-> run directories."""
from __future__ import annotations

import argparse
import sys

from pathways_jax.config import ConfigError
import pathways_jax.interop.hf.run_dir as run_dir
from pathways_jax.interop.hf.checkpoint import CheckpointError
from pathways_jax.interop.hf.config import SUPPORTED

_USAGE = """usage:
  python -m pathways_jax.interop.hf import --hf_dir=DIR --workdir=W [--dtype=float32]
      [--adapter_dir=PEFT_ADAPTER]
  python -m pathways_jax.interop.hf export --workdir=W --out=DIR [--step=N] [--model_type=llama]
      [--dtype=bfloat16] [--adapter=K (a multi-LoRA run: the adapter merged in)]
  python -m pathways_jax.interop.hf export-adapter --workdir=LORA_RUN --out=DIR [--step=N]
      [--base=BASE_MODEL_NAME_OR_PATH] [--adapter=K (a multi-LoRA run: which adapter)]"""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m pathways_jax.interop.hf', usage=_USAGE)
  parser.add_argument('command', choices=('import', 'export', 'export-adapter'))
  parser.add_argument('--hf_dir', default='')
  parser.add_argument('--adapter_dir', default='')
  parser.add_argument('--base', default=None)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='')
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--model_type', default=None, choices=SUPPORTED)
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'))
  parser.add_argument('--adapter', type=int, default=None,
                      help='a multi-LoRA run: the adapter to export (merged, or alone)')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      if not args.hf_dir:
        parser.error('import needs --hf_dir')
      path = run_dir.import_to_run(args.hf_dir, args.workdir, dtype=args.dtype or 'float32',
                                   adapter_dir=args.adapter_dir)
      with_adapter = f' with the adapter {args.adapter_dir}' if args.adapter_dir else ''
      print(f'imported {args.hf_dir}{with_adapter} into the run directory {path}')
    elif args.command == 'export-adapter':
      if not args.out:
        parser.error('export-adapter needs --out')
      path = run_dir.export_adapter(args.workdir, args.out, step=args.step,
                                    base_model_name_or_path=args.base,
                                    model_type=args.model_type, adapter_index=args.adapter)
      which = '' if args.adapter is None else f' (adapter {args.adapter})'
      print(f'exported the adapters of {args.workdir}{which} to {path}')
    else:
      if not args.out:
        parser.error('export needs --out')
      path = run_dir.export_run(args.workdir, args.out, step=args.step,
                                model_type=args.model_type, dtype=args.dtype,
                                adapter_index=args.adapter)
      print(f'exported {args.workdir} to {path}')
  except (CheckpointError, ConfigError, OSError) as e:
    print(f'Error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
