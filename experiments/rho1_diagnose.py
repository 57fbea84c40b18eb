"""Why SLM falls behind uniform in experiments/rho1.py: token-level look at finished arms.

    python experiments/rho1_diagnose.py --workdir=runs/rho1 [--steps=200,300] [--batches=8]

Loads the reference and the `slm` and `uniform` arms at the given checkpoint steps, and on the
first `--batches` training batches (noisy, with the known noise mask) and the clean validation
batches computes per-token losses. For each step it prints:

  * train: how well the excess loss L_slm - L_ref separates noise from clean targets (AUC: the
    probability that a random clean target scores above a random noise target; 0.5 = no
    separation), and what the top-60% selection keeps: the noise share of the kept targets and the
    share of the clean targets it drops;
  * val: the clean validation targets split by the same rule (top 60% of each batch by excess
    under the SLM model), and the mean loss of the SLM and uniform models on the kept / dropped
    halves: where SLM's deficit against uniform lies.

Writes WORKDIR/diagnose.json. Forward passes only (a minute or two on a CPU).
"""
from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags
import numpy as np

from pathways_jax import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_WORKDIR = flags.DEFINE_string('workdir', 'runs/rho1', 'the rho1 run (arms slm, uniform, reference)')
_STEPS = flags.DEFINE_list('steps', ['200', '300'], 'checkpoint steps of the arms')
_BATCHES = flags.DEFINE_integer('batches', 8, 'training batches to score')
_RATIO = flags.DEFINE_float('ratio', 0.6, 'k of the selection')
_REF = flags.DEFINE_string('reference', '', "reference run dir ('' = WORKDIR/reference)")


def _auc(pos, neg) -> float:
  """P(pos > neg) + 0.5 P(pos == neg), by ranks."""
  from scipy.stats import rankdata  # pylint: disable=g-import-not-at-top
  ranks = rankdata(np.concatenate([pos, neg]))
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from pathways_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pathways_jax.objectives import selective as sel  # pylint: disable=g-import-not-at-top
  from pathways_jax.tasks import rho1 as rho1_task  # pylint: disable=g-import-not-at-top
  from pathways_jax.train import loop  # pylint: disable=g-import-not-at-top
  rho1 = config_files.load_config_module(os.path.join(REPO, 'experiments', 'rho1.py'))
  wd = _WORKDIR.value
  missing = [arm for arm in ('reference', 'slm', 'uniform')
             if not os.path.isfile(os.path.join(wd, arm, 'config.json'))]
  if missing:
    print(f'error: {wd} lacks finished arm(s) {missing}: run experiments/rho1.py there first',
          file=sys.stderr)
    return 1
  cfg = rho1.get_config()
  cfg.selective.enabled = False
  tokenizer, _, _, mesh, rules = loop.build(cfg)

  def load(run_dir, step=0):
    c = copy.deepcopy(cfg)
    c.selective.reference.step = step
    return rho1_task.load_reference(c, run_dir, tokenizer, mesh, rules)

  def token_losses(ref_obj, batches):
    @jax.jit
    def f(params, b):
      logits = ref_obj.model.apply({'params': params}, b['tokens'], positions_BL=b['positions'],
                                   segment_ids_BL=b['segment_ids'])
      return sel.ar_token_losses(logits, b['tokens'], b['segment_ids'])
    out = [jax.device_get(f(ref_obj.params, {k: b[k] for k in ('tokens', 'positions',
                                                                'segment_ids')}))
           for b in batches]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])

  it = pipeline.make_train_iterator(cfg, tokenizer)
  train = [next(it) for _ in range(_BATCHES.value)]
  val = pipeline.make_eval_batches(cfg, tokenizer)
  noise = np.stack([b['noise'][:, 1:].astype(bool) for b in train])
  ref = load(_REF.value or os.path.join(wd, 'reference'))
  ref_tr, valid_tr = token_losses(ref, train)
  ref_va, valid_va = token_losses(ref, val)
  out = {'workdir': wd, 'reference': ref.run_dir, 'reference_step': ref.step,
         'batches': _BATCHES.value, 'ratio': _RATIO.value, 'steps': {}}

  def select(excess, valid):
    return np.stack([np.asarray(sel.select_tokens(e, v, _RATIO.value))
                     for e, v in zip(excess, valid)])

  for step in map(int, _STEPS.value):
    slm, uni = load(os.path.join(wd, 'slm'), step), load(os.path.join(wd, 'uniform'), step)
    slm_tr, _ = token_losses(slm, train)
    uni_tr, _ = token_losses(uni, train)
    exc = slm_tr - ref_tr
    kept = select(exc, valid_tr)
    clean, noisy = valid_tr & ~noise, valid_tr & noise
    tr = {
        'auc_excess_clean_above_noise': _auc(exc[clean], exc[noisy]),
        'noise_share_kept': float((kept & noisy).sum() / kept.sum()),
        'noise_dropped': float((~kept & noisy).sum() / noisy.sum()),
        'clean_dropped': float((~kept & clean).sum() / clean.sum()),
        'ref_loss_clean': float(ref_tr[clean].mean()), 'ref_loss_noise': float(ref_tr[noisy].mean()),
        'slm_loss_clean': float(slm_tr[clean].mean()), 'slm_loss_noise': float(slm_tr[noisy].mean()),
        'uniform_loss_clean': float(uni_tr[clean].mean()),
        'uniform_loss_noise': float(uni_tr[noisy].mean()),
        'excess_clean_kept': float(exc[kept & clean].mean()),
        'excess_clean_dropped': float(exc[~kept & clean].mean()),
        'excess_noise': float(exc[noisy].mean()),
    }
    slm_va, _ = token_losses(slm, val)
    uni_va, _ = token_losses(uni, val)
    kept_va = select(slm_va - ref_va, valid_va)
    drop_va = valid_va & ~kept_va
    va = {
        'slm_val': float(slm_va[valid_va].mean()), 'uniform_val': float(uni_va[valid_va].mean()),
        'ref_val': float(ref_va[valid_va].mean()),
        'kept': {'slm': float(slm_va[kept_va].mean()), 'uniform': float(uni_va[kept_va].mean()),
                 'ref': float(ref_va[kept_va].mean())},
        'dropped': {'slm': float(slm_va[drop_va].mean()), 'uniform': float(uni_va[drop_va].mean()),
                    'ref': float(ref_va[drop_va].mean())},
    }
    n = valid_va.sum()
    va['deficit_from_kept'] = float((slm_va - uni_va)[kept_va].sum() / n)
    va['deficit_from_dropped'] = float((slm_va - uni_va)[drop_va].sum() / n)
    out['steps'][step] = {'train': tr, 'val': va}
    print(f'step {step}: train {json.dumps({k: round(v, 4) for k, v in tr.items()})}')
    print(f'step {step}: val {json.dumps(va)}', flush=True)
  with open(os.path.join(wd, 'diagnose.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
