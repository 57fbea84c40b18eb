"""Loads directories written by `pathways_jax.interop.hf.save_pretrained` with transformers and
compares their logits (a reward model's rewards) with the golden files: the export half of the
round trip, checked by transformers itself (needs torch: run with the golden venv,
`make check-export-hf`).

    .venv/bin/python -c "...save_pretrained..."   # done by the make target
    .venv-golden/bin/python tests/golden/hf/check_export.py EXPORT_DIR
"""
import json
import os
import sys

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))


def main(export_root: str) -> int:
  worst = {}
  for case in sorted(os.listdir(export_root)):
    golden = np.load(os.path.join(HERE, case, 'golden.npz'))
    if 'rewards' in golden:  # a reward model: ...ForSequenceClassification, the reward per row
      model = transformers.AutoModelForSequenceClassification.from_pretrained(
          os.path.join(export_root, case), dtype=torch.float32).eval()
      assert model.config.num_labels == 1 and not hasattr(model, 'lm_head'), case
      with torch.no_grad():
        out = model(torch.tensor(golden['tokens'], dtype=torch.long)).logits[:, 0].numpy()
      want = golden['rewards']
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.join(export_root, case), dtype=torch.float32).eval()
      with torch.no_grad():
        out = model(torch.tensor(golden['tokens'], dtype=torch.long)).logits.numpy()
      want = golden['logits']
    worst[case] = float(np.abs(out - want).max())
  print(json.dumps(worst, indent=2))
  bad = {k: v for k, v in worst.items() if not v <= 1e-4}
  if bad:
    print(f'FAILED: {bad}')
    return 1
  print(f'transformers loads every export with the golden logits (max |diff| '
        f'{max(worst.values()):.1e}; transformers {transformers.__version__})')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
